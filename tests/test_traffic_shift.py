"""benchmarks/traffic_shift.py keeps working: the --quick run through every arm in process, a run
against the real server, and one-line CLI errors. Figures are not asserted (benchmarks report them)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from aurora_sgl import reference_head_path
from benchmarks.common.server import ServerProcess

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "traffic_shift.py"
sys.path.insert(0, str(REPO / "benchmarks"))
import traffic_shift as ts  # noqa: E402


def _run(*args, timeout=300):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


ANSWER_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"enum": ["yes", "no"]}, "unit": {"enum": ["apples", "pears"]}},
    "required": ["answer", "unit"],
    "additionalProperties": False,
}


def _own_stream(tmp_path) -> tuple[list[str], list[str]]:
    """Three small domains written here, for machines without ../shared/datasets."""
    code = [
        json.dumps({"prompt": f'def {name}(values):\n    """Return the {name} of a list."""\n'})
        for name in ("total", "largest", "smallest", "average", "count", "first", "last", "middle")
    ]
    chat = [json.dumps({"messages": [{"role": "user", "content": f"Tell me about the number {i}."}]}) for i in range(8)]
    math = [  # structured traffic: each answer is constrained to a small JSON schema
        json.dumps(
            {
                "prompt": f"Question: Tom has {i + 3} apples and buys {2 * i + 1} more. "
                "Does he have more than ten apples?\nAnswer as JSON:",
                "json_schema": ANSWER_SCHEMA,
            }
        )
        for i in range(8)
    ]
    paths = []
    for name, rows in (("code", code), ("chat", chat), ("math", math)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
        paths.append(str(tmp_path / f"{name}.jsonl"))
    return ["--stream", ",".join(paths)], ["code", "chat", "math", "code"]


def test_quick_run_through_every_arm(tmp_path):
    out = tmp_path / "ts.json"
    if ts.DATA.is_dir():  # the default stream: HumanEval, MT-Bench, GSM8K test
        stream, domains = [], ["humaneval", "mt_bench", "gsm8k", "humaneval"]
    else:
        stream, domains = _own_stream(tmp_path)
    # A fixed K: what is checked here is that every arm runs and the trained heads draft.
    res = _run("--quick", "--fixed-k", "--shift", "return", *stream, "--out", str(out))
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    n = 4 * ts.QUICK["requests_per_phase"]  # return stream: three domains, then the first again
    assert data["config"]["fixed_k"] and data["arms"]["static"]["adaptive"] is None
    assert data["arms"]["static"]["k_steps"][:4] == [0, 0, 0, 0] and data["arms"]["static"]["k_steps"][4] > 0
    assert [r["domain"] for r in data["stream"]][:: ts.QUICK["requests_per_phase"]] == domains
    assert set(data["arms"]) == set(ts.ARMS)
    for arm, res_arm in data["arms"].items():
        rows = res_arm["requests"]
        assert [r["index"] for r in rows] == list(range(n))
        assert all(r["completion_tokens"] > 0 and r["tokens_per_s"] > 0 for r in rows)
        if arm == "nospec":
            assert all(r["accept_length"] == r["head_accept_length"] == 1.0 for r in rows)
        else:
            assert all(1.0 <= r["accept_length"] <= 5.0 and len(r["accept_per_position"]) == 4 for r in rows)
            # At a fixed K the head's figure is the accept length (per-position rates are rounded).
            assert all(abs(r["head_accept_length"] - r["accept_length"]) < 5e-4 for r in rows)
    for arm in ("static", "offline"):  # trained heads get drafts accepted
        assert sum(r["accept_length"] for r in data["arms"][arm]["requests"]) / n > 1.5
    for arm in ts.ONLINE_ARMS:
        assert data["arms"][arm]["trainer"]["alive"] and data["arms"][arm]["trainer_steps_per_request"] is not None
        assert all(r["draft_version"] >= 1 and r["trainer_steps"] is not None for r in data["arms"][arm]["requests"])
    # Only the arm that starts from a pretrained head keeps a fallback: day 0 drafts with its live head.
    assert {r["draft_head"] for r in data["arms"]["day0"]["requests"]} == {"live"}
    assert {r["draft_head"] for r in data["arms"]["online_static"]["requests"]} <= {"live", "fallback1"}
    assert data["config"]["fallback_head"] is True
    s = data["summary"]
    assert set(s["phase_tau"]) == set(ts.ARMS) and all(len(v) == 4 for v in s["phase_tau"].values())
    for key in ("online_over_static_after_shift", "day0_over_offline"):
        assert isinstance(s[key], float) and s[key] > 0
    assert all(len(v) == 3 for v in s["recovery_requests"].values())
    assert set(s["return_retention"]) == set(ts.ARMS) - {"nospec"}
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert "online_over_static_after_shift" in res.stdout


def test_arms_choose_k_per_step_unless_fixed(tmp_path):
    stream, _ = _own_stream(tmp_path)
    out = tmp_path / "adaptive.json"
    res = _run("--quick", "--arms", "nospec,static", *stream, "--out", str(out), "--no-plot")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    static = data["arms"]["static"]
    assert not data["config"]["fixed_k"] and static["adaptive"]["k_max"] == 4
    # The arm's request-steps per K add up over its requests: at least one request per decode step.
    per_step = [static["adaptive"]["k_steps"][str(k)] for k in range(5)]
    assert all(n >= m for n, m in zip(static["k_steps"], per_step)) and sum(per_step) > 0
    assert all(1.0 <= r["accept_length"] <= 5.0 for r in static["requests"])
    for r in static["requests"]:  # the head's figure exists exactly where the request drafted
        drafted = sum(r["k_steps"][1:]) > 0
        assert (r["head_accept_length"] is not None) == drafted, r
        assert not drafted or 1.0 <= r["head_accept_length"] <= 5.0
    assert data["summary"]["speedup_over_nospec"]["static"] > 0
    assert len(data["summary"]["served_phase_tau"]["static"]) == len(data["summary"]["phase_tau"]["static"])
    # The math domain is constrained: every answer is the schema's JSON, the same with and without
    # speculation (greedy), and the unconstrained rows carry no text.
    texts = {arm: [r.get("text") for r in data["arms"][arm]["requests"]] for arm in ("nospec", "static")}
    constrained = [i for i, r in enumerate(static["requests"]) if r["domain"] == "math"]
    assert constrained and all(static["requests"][i]["constraint"] == "json_schema" for i in constrained)
    for i in constrained:
        answer = json.loads(texts["static"][i])
        assert answer["answer"] in ("yes", "no") and answer["unit"] in ("apples", "pears"), answer
    assert texts["static"] == texts["nospec"]
    assert all(texts["static"][i] is None for i in range(len(texts["static"])) if i not in constrained)


@pytest.mark.parametrize("cut", [0, 4])
def test_trainer_budget_keeps_the_trainer_in_lockstep(tmp_path, cut):
    # A modelled trainer device: before each admission the driver waits for 2 x the recorded
    # positions to be trained, and the trainer itself stops at that budget. With cuts of running
    # requests (cut_open_positions) the rows a cut runs over as context count against it too.
    stream, _ = _own_stream(tmp_path)
    out = tmp_path / "budget.json"
    config = ["--trainer-config", json.dumps({"cut_open_positions": cut})] if cut else []
    res = _run("--quick", "--arms", "day0", *stream, "--trainer-budget", "2", *config, "--out", str(out), "--no-plot")
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    arm = data["arms"]["day0"]
    assert data["config"]["trainer_budget"] == 2 and data["config"]["trainer_config"]["position_budget"] == 2
    trainer, recorded = arm["trainer"], arm["flywheel"]["recorded_positions"]
    assert trainer["recorded_positions"] <= recorded and trainer["step_failures"] == 0
    # At the last admission the trainer had 2 x what was recorded; the last requests add records.
    assert 1.0 <= arm["positions_per_recorded_position"] <= 2.5, arm["positions_per_recorded_position"]
    assert arm["budget_wait_s"] > 0
    assert data["summary"]["positions_per_recorded_position"]["day0"] == arm["positions_per_recorded_position"]
    # Each recorded position is learned from once, fresh; the rest of the budget replays them.
    assert 0 < arm["fresh_per_recorded_position"] <= 1.0 < arm["positions_per_recorded_position"]
    assert data["summary"]["fresh_per_recorded_position"]["day0"] == arm["fresh_per_recorded_position"]
    # The driver's wait and the trainer's stop agree on what the device spent (no stall above).
    assert (trainer["context_positions"] > 0) == bool(cut), trainer["context_positions"]


def test_drives_a_running_server(tmp_path):
    stream = tmp_path / "s.jsonl"
    stream.write_text("".join(json.dumps({"prompt": f"def add_{i}(a, b):\n"}) + "\n" for i in range(3)))
    chat = tmp_path / "c.jsonl"
    question = {"messages": [{"role": "user", "content": "Is 7 times 8 more than 50?"}], "json_schema": ANSWER_SCHEMA}
    chat.write_text(json.dumps(question) + "\n")
    out = tmp_path / "url.json"
    server = ServerProcess(
        "--no-online",
        "--speculative-draft-model-path",
        reference_head_path(),
        "--no-speculative-adaptive",  # every step drafts 4: the rows below measure each position
    )
    try:
        res = _run(
            "--url",
            server.url,
            "--stream",
            f"{stream},{chat}",
            "--requests-per-phase",
            "3",
            "--max-tokens",
            "48",
            "--window",
            "2",
            "--out",
            str(out),
            "--no-plot",
            timeout=120,
        )
    finally:
        server.stop()
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    rows = data["arms"]["server"]["requests"]
    assert [r["domain"] for r in rows] == ["s"] * 3 + ["c"] * 3
    assert all(
        r["accept_length"] >= 1.0 and len(r["accept_per_position"]) == 4 and r["draft_version"] == 0 for r in rows
    )
    assert data["summary"]["phase_tau"]["server"][0] > 1.0
    for r in rows[3:]:  # the chat rows' answers were constrained by the server (native json_schema)
        assert r["constraint"] == "json_schema" and json.loads(r["text"])["unit"] in ("apples", "pears"), r


@pytest.mark.parametrize(
    "args, message",
    [
        (["--stream", "/nonexistent/a.jsonl"], "stream file not found: /nonexistent/a.jsonl"),
        (["--arms", "nospec,turbo"], "unknown arm turbo"),
        (["--trainer-config", '{"lr": 5}'], "--trainer-config: lr must be"),
        (["--requests-per-phase", "0"], "--requests-per-phase must be at least 1"),
        (["--url", "http://127.0.0.1:1", "--no-fallback-head"], "--no-fallback-head is for in-process arms"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, message):
    if "--stream" not in args:  # a valid stream, so the flag under test is what fails
        args = [*args, *_own_stream(tmp_path)[0]]
    res = _run(*args, "--out", str(tmp_path / "x.json"), timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr


def test_bad_stream_row_is_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"title": "no prompt here"}\n')
    res = _run("--stream", str(bad), "--arms", "nospec", "--out", str(tmp_path / "x.json"), timeout=60)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "bad.jsonl:1" in res.stderr


def test_head_accept_length_is_the_chain_of_per_position_rates():
    assert ts.head_accept_length([0.9, 0.6, 0.3, 0.1], 7) == 2.9
    assert ts.head_accept_length([0.0, 0.0], 0) is None  # never drafted: nothing measured
    assert ts.head_accept_length([], 0) == 1.0  # no draft positions: no speculation
    assert ts.head_accept_length(None, 3) is None


def _rows(taus, heads):
    return [{"accept_length": t, "head_accept_length": h} for t, h in zip(taus, heads)]


def test_summary_compares_heads_not_the_k_each_arm_chose():
    """Under adaptive K an arm that drafts little serves an accept length near 1 whatever its head;
    the issue's figures come from the heads' own figures, and requests that never drafted (None)
    are left out rather than counted as 1."""
    stream = [{"phase": p, "domain": d} for p, d in [(0, "a")] * 4 + [(1, "b")] * 4]
    arms = {
        # static: a good head kept at K = 0 for most of phase b (served 1.0, never drafted: None)
        "static": {"tokens_per_s": 1.0, "requests": _rows([3, 3, 3, 3, 1, 1, 1, 2], [3, 3, 3, 3, None, None, None, 2])},
        "online_static": {"tokens_per_s": 1.0, "requests": _rows([3] * 8, [3] * 8)},
    }
    s = ts.summarize(arms, stream, window=2, shift="sharp")
    assert s["phase_tau"]["static"] == [3.0, 2.0] and s["served_phase_tau"]["static"] == [3.0, 1.25]
    assert s["online_over_static_after_shift"] == 1.5  # 3 / 2, not 3 / 1.25
    assert s["last_window_tau"]["static"] == 2.0  # the window's one known value
    assert ts.windowed([1, None, 3, None, None], 2) == [1, 1, 3, 3, None]
    assert ts.recovery_requests([3.0, 3.0, None, None, 3.0, 3.0], 2, 6, window=2) == 3
    # Rows written before head_accept_length existed: from their per-position rates and K counts,
    # else (older still, a fixed K) their accept length.
    old = {"accept_length": 1.5, "accept_per_position": [0.5, 0.25], "k_steps": [9, 0, 1]}
    assert ts.head_taus([old, dict(old, k_steps=[10, 0, 0]), {"accept_length": 2.5}]) == [1.75, None, 2.5]


def test_recovery_and_windows_are_measured_from_the_series():
    assert ts.windowed([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    taus = [3.0] * 4 + [1.0] * 3 + [2.8] * 5  # shift at 4; back within 10% of 3.0 once the window is >= 2.7
    assert ts.recovery_requests(taus, 4, len(taus), window=2) == 5  # window [2.8, 2.8] ends at request 9
    assert ts.recovery_requests([3.0] * 4 + [1.0] * 4, 4, 8, window=2) is None
    stream = ts.build_stream([("a", ["a0", "a1"]), ("b", ["b0"]), ("c", ["c0"])], "smooth", 10, seed=1)
    doms = [r["domain"] for r in stream]
    assert len(stream) == 30 and doms[0] == "a" and doms[-1] == "c"
    assert doms[:10].count("a") > doms[20:].count("a")  # the mixture drifts
