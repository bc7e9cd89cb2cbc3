"""README claims that had no test (issue 17): the offline trainer's command line, benchmarks/swap.py,
and --served-model-name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from aurora_sgl.engine.draft_head import Eagle3Head
from benchmarks.common.server import ServerProcess

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")


def test_offline_train_command_line_writes_a_loadable_head(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"def f{i}(x):\n"}) + "\n" for i in range(4)))
    out = tmp_path / "head"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "aurora_sgl.offline_train",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
            "--steps",
            "3",
            "--max-new-tokens",
            "8",
            "--batch-size",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    head = Eagle3Head.load(out, _embedding())
    assert head.config.draft_vocab_size > 0
    bad = subprocess.run(
        [sys.executable, "-m", "aurora_sgl.offline_train", "--prompts", str(tmp_path / "none"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=REPO,
    )
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and bad.stderr.strip(), bad.stderr[-500:]


def _embedding():
    from transformers import AutoModelForCausalLM

    from aurora_sgl import reference_model_path

    return AutoModelForCausalLM.from_pretrained(reference_model_path()).get_input_embeddings()


def test_swap_benchmark_runs(tmp_path):
    out = tmp_path / "swap.json"
    r = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "swap.py"),
            "--out",
            str(out),
            "--swaps",
            "20",
            "--concurrency",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=ENV,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(out.read_text())
    assert res["swaps"] >= 20 and res["refused"] == 0 and res["steps"] > 0, res
    assert 0 < res["swap_pause_ms_p50"] <= res["swap_pause_ms_max"] and 0 <= res["recording_overhead_frac"] < 1


def test_served_model_name_is_what_the_api_answers_to():
    s = ServerProcess("--no-online", "--speculative-num-steps", "2", "--served-model-name", "my-model")
    try:
        assert [m["id"] for m in httpx.get(s.url + "/v1/models").json()["data"]] == ["my-model"]
        ok = httpx.post(s.url + "/v1/completions", json={"model": "my-model", "prompt": "x", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["model"] == "my-model"
        other = httpx.post(s.url + "/v1/completions", json={"model": "someone-else", "prompt": "x", "max_tokens": 2})
        assert other.status_code == 404
        assert httpx.get(s.url + "/get_model_info").json()["served_model_name"] == "my-model"
    finally:
        s.stop()
