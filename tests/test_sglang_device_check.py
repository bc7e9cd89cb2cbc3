"""The SGLang device check's pieces on CPU (`launch/device_check.sh --sglang`; the check itself
needs GPUs): the plugin counters it reads, the ring-vs-recompute comparison on records of the
embedded engine, the command lines of its launches (SGLang's own parse), and its isolation of one
check from the next (a check that hangs, raises or dies is a FAIL row and the rest go on)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from aurora_sgl import reference_head_path, reference_model_path
from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.sglang_backend import check_tools as ct
from aurora_sgl.sglang_backend import device_check as dc
from aurora_sgl.sglang_backend.recompute import REL_TOL, compare, eager_states
from aurora_sgl.sglang_backend.swap_facts import (
    differences,
    expected_params,
    hot_digest,
    row_fingerprint,
    sglang_layout,
)

ROOT = Path(__file__).resolve().parents[1]


# ---- no GPU: one line, no traceback --------------------------------------------------------------------
def test_sglang_mode_without_cuda_is_one_line():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    p = subprocess.run(
        [str(ROOT / "launch" / "device_check.sh"), "--sglang"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in p.stderr and "Traceback" not in p.stderr


# ---- ring rows against the eager recompute (records of the embedded engine) -----------------------------
@pytest.fixture(scope="module")
def engine_records():
    """Records of the embedded engine (reference model and head, K = 4, bf16 like SGLang serves,
    prompts prefilled in chunks of 16) as a ring reader gets them, and each request's tokens."""
    from aurora_sgl.engine.engine import Engine
    from aurora_sgl.engine.sampling import SamplingParams
    from aurora_sgl.transport.signal_ring import SignalRing

    eng = Engine(
        num_speculative_steps=4,
        draft_model_path=reference_head_path(),
        prefill_chunk_size=16,
        max_running_requests=4,
        dtype=torch.bfloat16,
    )
    h = eng.head.config.hidden_size
    ring = SignalRing.create("test_dc_ring", 1024, 5, 3 * h, h, 4)
    reader = SignalRing.attach(ring.spec())
    eng.record_sink = ring.write_many
    tok = eng.tokenizer
    texts = ["The quick brown fox jumps over the lazy dog. " * 3, "ROMEO:\nBut soft, what light", "def add(a, b):\n"]
    prompts = [tok(t)["input_ids"] for t in texts]
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=24))
    records = reader.read(1024)
    reader.close()
    ring.close()
    sequences = {o["meta_info"]["id"]: p + o["output_ids"] for p, o in zip(prompts, outs)}
    return records, sequences, list(eng.target.aux_layer_ids)


@pytest.fixture(scope="module")
def recompute(engine_records):
    """The float32 eager recompute the GPU check runs (our TargetModel), on CPU."""
    from aurora_sgl.engine.target import TargetModel, load_hf_causal_lm

    _, sequences, aux = engine_records
    target = TargetModel(load_hf_causal_lm(reference_model_path()), 1, 128, aux)
    return {rid: eager_states(target, seq) for rid, seq in sequences.items()}, target


def test_ring_rows_equal_the_eager_recompute(engine_records, recompute):
    records, sequences, aux = engine_records
    states, _ = recompute
    c = compare(records, sequences, states, len(aux))
    assert c.ok(), c.summary()
    assert c.prompt_rows > 0 and c.decode_rows > 0 and not c.missing_requests
    # bf16 serving against a float32 recompute: well inside the tolerance, far from a wrong row
    assert max(c.aux_err) < REL_TOL / 3 and c.final_err < REL_TOL / 3, c.summary()


def test_the_comparison_catches_a_shifted_row_a_wrong_layer_and_a_lost_record(engine_records, recompute):
    import dataclasses

    records, sequences, aux = engine_records
    states, target = recompute
    shifted = [dataclasses.replace(r, position=r.position + 1) for r in records]
    c = compare(shifted, sequences, states, len(aux))
    assert not c.ok() and c.token_mismatches > 0 and "input token" in c.first_problem
    # the capture reading other layers than the head's aux layers
    target.aux_layer_ids = [0, 2, 5]
    try:
        wrong = {rid: eager_states(target, seq) for rid, seq in sequences.items()}
    finally:
        target.aux_layer_ids = aux
    c = compare(records, sequences, wrong, len(aux))
    assert not c.ok() and min(c.aux_err) > 0.1 and c.final_err < REL_TOL / 3
    c = compare(records[:5] + records[6:], sequences, states, len(aux))  # one record lost
    assert not c.ok() and c.uncovered > 0
    first = next(iter(sequences))
    c = compare(records, sequences, states, len(aux), starts={first: 3})  # a radix hit that did not show
    assert not c.ok() and c.bad_start == 1


# ---- plugin counters the check reads (swap facts) ------------------------------------------------------
try:  # SGLang's real EAGLE-3 draft module on CPU (a fixture of the backend's tests)
    from test_sglang_backend import _load_with_sglang, _Target, sgl_draft_factory  # noqa: F401
except pytest.skip.Exception:  # no sglang here
    sgl_draft_factory = None


def _sglang_worker(sgl_draft_factory, served):
    """What the plugin sees in a scheduler: an EAGLEWorkerV2 whose draft worker holds SGLang's draft
    module with the served head loaded, and the hot map SGLang creates after the worker's __init__."""
    from types import SimpleNamespace

    from sglang.srt.speculative.eagle_worker_v2 import EagleDraftWorker, EAGLEWorkerV2
    from sglang.srt.speculative.spec_info import SpeculativeAlgorithm

    draft = _load_with_sglang(sgl_draft_factory(reference_head_path()), Path(reference_head_path()))
    c = served.config
    runner = SimpleNamespace(
        model=_Target(c.vocab_size, c.hidden_size), model_config=SimpleNamespace(model_path=None, revision=None)
    )
    runner.load_config = None
    dw = object.__new__(EagleDraftWorker)
    dw.speculative_algorithm = SpeculativeAlgorithm.from_string("EAGLE3")
    dw.draft_runner, dw.target_worker = SimpleNamespace(model=draft), SimpleNamespace(model_runner=runner)
    worker = object.__new__(EAGLEWorkerV2)
    worker._draft_worker, worker._target_worker = dw, dw.target_worker
    return worker, dw


def _permuted(head: Eagle3Head, seed: int = 13) -> tuple[dict, torch.Tensor]:
    """The head's serving state with its draft vocabulary permuted: d2t and lm_head rows by one
    permutation (the same drafts), and the new hot map."""
    perm = torch.randperm(head.config.draft_vocab_size, generator=torch.Generator().manual_seed(seed))
    state = head.serving_state()
    hot = head.hot_ids[perm]
    state["d2t"] = hot - torch.arange(hot.numel())
    state["lm_head.weight"] = state["lm_head.weight"][perm]
    return state, hot


@pytest.mark.skipif(sgl_draft_factory is None, reason="needs sglang")
def test_exported_swap_facts_say_what_sglangs_draft_holds(sgl_draft_factory, tmp_path):
    from aurora_sgl.sglang_backend import plugin
    from aurora_sgl.transport.weight_store import WeightStore, layout_of

    served = Eagle3Head.load(reference_head_path(), torch.zeros(0))
    worker, dw = _sglang_worker(sgl_draft_factory, served)
    store = WeightStore.create("test_dc_facts", layout_of(served.serving_state()))
    try:
        store.publish(served.serving_state())
        swapper = plugin.draft_swapper(worker, store.names, store.layout)
        rt = plugin.Runtime(
            staging=None, ring=None, store=store, swapper=swapper, leader=True, handoff_dir=str(tmp_path)
        )
        rt.draft_version = 1
        dw.init_token_map()  # SGLang's alloc_memory_pool, after the worker's __init__
        dw.init_lm_head()
        rt.export_counters()  # the first scheduler iteration: what SGLang loaded
        first = json.loads((tmp_path / "counters_dp0_rank0.json").read_text())
        assert first["hot_is_worker_tensor"] is None  # nothing bound before the first swap
        assert first["swap_facts"]["version"] == 1
        assert differences(first["swap_facts"], expected_params(served.serving_state()), None) == []
        state, hot = _permuted(served)
        version = store.publish(state)
        assert rt.swap_to(version)
        rt.export_counters()
        c = json.loads((tmp_path / "counters_dp0_rank0.json").read_text())
    finally:
        store.close()
    facts = c["swap_facts"]
    assert c["hot_is_worker_tensor"] is True and facts["version"] == version == c["draft_version"]
    assert facts["hot_head"] == hot[:8].tolist() and facts["hot_digest"] == hot_digest(hot)[0]
    assert set(facts["params"]) == set(sglang_layout(state)) and "model.embed_tokens.weight" not in facts["params"]
    assert differences(facts, expected_params(state), hot_digest(hot)) == []
    # what the check would say if the swap had missed something: the old head, or the fused
    # q / k / v blocks in the wrong place (k and v have the same shape here)
    old = differences(facts, expected_params(served.serving_state()), hot_digest(served.hot_ids))
    assert any("lm_head" in d for d in old) and any("hot map" in d for d in old)
    swapped = dict(state)
    k, v = "midlayer.self_attn.k_proj.weight", "midlayer.self_attn.v_proj.weight"
    swapped[k], swapped[v] = state[v], state[k]
    assert [d.split()[0] for d in differences(facts, expected_params(swapped), None)] == [
        "model.layers.0.self_attn.qkv_proj.weight"
    ]


def test_swap_facts_never_break_serving(tmp_path):
    """An error while summarising the draft turns the facts off; the iteration (swaps, the ring)
    goes on."""
    from types import SimpleNamespace

    from aurora_sgl.sglang_backend import plugin

    swapper = SimpleNamespace(
        _hot_of=lambda: None, hot=None, skipped=[], params={"w": None}, live_tensors=lambda: []
    )  # a parameter that is not a tensor
    rt = plugin.Runtime(staging=None, ring=None, store=None, swapper=swapper, leader=True, handoff_dir=str(tmp_path))
    rt.iteration()
    c = json.loads((tmp_path / "counters_dp0_rank0.json").read_text())
    assert "swap_facts_error" in c and not rt.broken
    rt._last_export = 0.0
    rt.iteration()
    assert "swap_facts_error" in json.loads((tmp_path / "counters_dp0_rank0.json").read_text())


def test_fingerprints_see_values_and_row_order():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(6, 5, generator=g).to(torch.bfloat16)
    assert float(row_fingerprint(t)) == float(row_fingerprint(t.clone()))
    assert float(row_fingerprint(t)) != float(row_fingerprint(t[[1, 0, 2, 3, 4, 5]]))
    head = Eagle3Head.load(reference_head_path(), torch.zeros(0))
    layout = sglang_layout(head.serving_state())
    assert layout["model.layers.0.mlp.gate_up_proj.weight"].shape[0] == 2 * head.config.intermediate_size
    assert "d2t" not in layout and "lm_head.weight" in layout and "model.fc.weight" in layout
    bf16 = expected_params(head.serving_state(), torch.bfloat16)
    assert bf16["lm_head.weight"][0] != expected_params(head.serving_state())["lm_head.weight"][0]


def test_fingerprints_reduce_in_chunks_with_the_same_result(monkeypatch):
    """Rows are reduced a chunk at a time (no float64 copy of a whole lm_head): the value is the
    row-weighted sum whatever the chunk."""
    from aurora_sgl.sglang_backend import swap_facts

    t = torch.randn(37, 11, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    naive = sum((r + 1) * float(t[r].double().sum()) for r in range(t.shape[0]))
    whole = float(row_fingerprint(t))
    monkeypatch.setattr(swap_facts, "CHUNK_ELEMENTS", 3 * 11)  # 3 rows per chunk, the last one short
    assert float(row_fingerprint(t)) == pytest.approx(whole, rel=1e-12) == pytest.approx(naive, rel=1e-12)


def test_fact_differences_skip_shards_and_shared_parameters():
    expected = {"a": [1.0, [4, 2]], "b": [2.0, [3]], "lm_head.weight": [5.0, [8, 2]]}
    live = {"params": {"a": [1.0, [2, 2]], "b": [2.0, [3]]}, "hot_digest": 7.0, "hot_head": [1, 2]}
    assert differences(live, expected, (7.0, [1, 2]), skipped=["lm_head.weight"]) == []
    assert differences(live, expected, (7.0, [1, 2])) == ["lm_head.weight not in the live draft"]
    assert differences(live, expected, (7.0, [2, 1]), skipped=["lm_head.weight"])[0].startswith("hot map")
    assert differences({"params": {"a": [1.0, [2, 2]]}}, {"a": [1.0, [4, 2]]}, None) == [
        "no parameter comparable (every shape differs)"
    ]


def test_capture_counts_its_largest_verify_batch():
    from aurora_sgl.sglang_backend.capture import CaptureStaging, VerifyStep

    st = CaptureStaging(8, 2, 6, 2)
    for bs in (3, 5, 2):
        d = 3
        st.capture(
            VerifyStep(
                request_ids=[f"r{i}" for i in range(bs)],
                positions=[0] * bs,
                root_tokens=torch.zeros(bs, dtype=torch.long),
                draft_tokens=torch.zeros(bs, d, dtype=torch.long),
                predict=torch.zeros(bs * d, dtype=torch.long),
                accept_lens=torch.ones(bs, dtype=torch.long),
                accept_index=torch.zeros(bs, d, dtype=torch.long),
                aux_hidden=torch.zeros(bs * d, 6),
                final_hidden=torch.zeros(bs * d, 2),
                topk=1,
            )
        )
    assert st.max_batch == 5 and st.captured == 3


# ---- command lines, batch sizes, environment ---------------------------------------------------------------
def test_launch_command_lines_parse_as_sglang_reads_them():
    """Every launch of the check, through SGLang's own `prepare_server_args`: the plugin-only ring
    servers as our launcher would build them (EAGLE3, topk 1 / 4, no overlap, the graph and chunk
    sizes), and our launcher's own command lines (TP 2, --no-online)."""
    pytest.importorskip("sglang")
    from sglang.srt.server_args import prepare_server_args

    from aurora_sgl.launch_server import build_parser, resolve_defaults
    from aurora_sgl.sglang_backend.launcher import build_server_args

    model, head = reference_model_path(), reference_head_path()
    graph = ["--cuda-graph-max-bs-decode", "16", "--chunked-prefill-size", "128"]
    topk4 = ["--speculative-eagle-topk", "4", "--speculative-num-draft-tokens", "8"]
    parsed = {}
    for name, flags in (("topk1", []), ("topk4", topk4), ("no_overlap", ["--disable-overlap-schedule"])):
        argv = ct.plugin_sglang_args(model, head, 31001, graph + flags)
        assert ct.plugin_server_argv(argv)[1:3] == ["-m", "sglang.launch_server"]
        parsed[name] = prepare_server_args(argv)
    for sa in parsed.values():
        assert (sa.speculative_algorithm, sa.speculative_num_steps, sa.dtype) == ("EAGLE3", 5, "bfloat16")
        assert (sa.cuda_graph_max_bs_decode, sa.chunked_prefill_size, sa.port) == (16, 128, 31001)
        assert sa.speculative_draft_model_path == head and not sa.disable_radix_cache
    assert (parsed["topk1"].speculative_eagle_topk, parsed["topk1"].speculative_num_draft_tokens) == (1, 6)
    assert (parsed["topk4"].speculative_eagle_topk, parsed["topk4"].speculative_num_draft_tokens) == (4, 8)
    assert parsed["no_overlap"].disable_overlap_schedule and not parsed["topk1"].disable_overlap_schedule
    captured, max_bs = ct.graph_batch_sizes(ct.plugin_sglang_args(model, head, 31001, graph))
    assert captured == [1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16] and max_bs == 16
    for extra, online, tp in (([], True, 1), (["--tp-size", "2"], True, 2), ([], False, 1)):
        argv = ct.launcher_argv(model, 31002, extra, online=online)
        assert argv[1:3] == ["-m", "aurora_sgl.launch_server"]
        args, rest = build_parser().parse_known_args(argv[3:])
        resolve_defaults(args)
        sa = build_server_args(args, rest, head)
        assert (args.backend, args.online, sa.tp_size, sa.port, sa.speculative_eagle_topk) == (
            "sglang",
            online,
            tp,
            31002,
            1,
        )


def test_batch_plan_pads_and_overflows_the_captured_graphs():
    assert ct.batch_plan([1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16], 16) == {
        "batch 1": 1,
        "padded graph batch": 9,
        "above graph max batch": 19,
    }
    assert ct.batch_plan([1, 2, 4, 8], 8) == {"batch 1": 1, "padded graph batch": 3, "above graph max batch": 11}
    assert "padded graph batch" not in ct.batch_plan(list(range(1, 9)), 8)  # every size has a graph


def test_plugin_env_and_visible_gpus():
    env = ct.plugin_env({"PATH": "/bin"}, "/tmp/h")
    assert env == {"PATH": "/bin", "AURORA_SGL_HANDOFF_DIR": "/tmp/h"}
    assert ct.plugin_env({"SGLANG_PLUGINS": "other"}, "/h")["SGLANG_PLUGINS"] == "other,aurora_sgl"
    assert ct.plugin_env({"SGLANG_PLUGINS": "aurora_sgl, x"}, "/h")["SGLANG_PLUGINS"] == "aurora_sgl, x"
    assert ct.visible_gpus(None, 3) == ["0", "1", "2"]
    assert ct.visible_gpus("4, 6", 2) == ["4", "6"]
    assert ct.visible_gpus("GPU-aa,GPU-bb", 1) == ["GPU-aa"]


def test_scenario_facts_require_what_each_scenario_is_for():
    def sc(name, seqs, starts, max_batch, counters):
        return ct.Scenario(name, seqs, starts, [], dict({"captured": 10}, **counters), max_batch, 2.0)

    nine = {f"r{i}": [1, 2, 3] for i in range(9)}
    assert dc.scenario_facts(sc("padded graph batch", nine, {}, 9, {}), 16)[0]
    assert not dc.scenario_facts(sc("padded graph batch", nine, {}, 7, {}), 16)[0]  # never ran 9 at once
    assert not dc.scenario_facts(sc("above graph max batch", nine, {}, 16, {}), 16)[0]
    assert dc.scenario_facts(sc("above graph max batch", nine, {}, 19, {}), 16)[0]
    one = {"c": list(range(600))}
    assert not dc.scenario_facts(sc("chunked prefill", one, {}, 1, {"prefill_captured": 1}), 16)[0]
    ok, note = dc.scenario_facts(sc("chunked prefill", one, {}, 1, {"prefill_captured": 5}), 16)
    assert ok and "5 prefill batches for 600 tokens" in note
    assert not dc.scenario_facts(sc("radix hit", {"a": [1], "b": [1]}, {"a": 0, "b": 0}, 1, {}), 16)[0]
    assert dc.scenario_facts(sc("radix hit", {"a": [1], "b": [1]}, {"a": 0, "b": 250}, 1, {}), 16)[0]
    ok, note = dc.scenario_facts(sc("batch 1", {"a": [1]}, {}, 1, {"staging_drops": 2}), 16)
    assert ok and "staging_drops" in note


def test_token_prompts_are_distinct_and_start_with_bos():
    src = ct.TokenSource(reference_model_path())
    a, b = src.take(40), src.take(40)
    assert len(a) == len(b) == 41 and a[0] == b[0] == 1 and a != b
    assert len(src.take(16, bos=False)) == 16
    assert len(set(ct.text_prompts(8))) == 8


def _gone(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# ---- a server process, HTTP, the ring drain ----------------------------------------------------------------
_FAKE_SERVER = textwrap.dedent("""
    import json, subprocess, sys, time
    from http.server import BaseHTTPRequestHandler, HTTPServer
    if sys.argv[2] == "die":
        print("RuntimeError: CUDA out of memory (fake)", flush=True)
        sys.exit(3)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[3], "w").write(str(child.pid))
    time.sleep(1.0)

    class H(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def _send(self, code, obj):
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        def do_GET(self):
            self._send(200, {})
        def do_POST(self):
            req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            ids = req["input_ids"]
            self._send(200, {"output_ids": [7, 8], "meta_info": {"id": req["rid"], "cached_tokens": len(ids) // 2}})

    HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


def test_server_ready_generate_stop_and_a_server_that_dies(tmp_path):
    script = tmp_path / "fake_server.py"
    script.write_text(_FAKE_SERVER)
    port, pidfile = ct.free_port(), tmp_path / "child.pid"
    s = ct.Server(
        "fake", [sys.executable, str(script), str(port), "ok", str(pidfile)], dict(os.environ), str(tmp_path), port
    )
    try:
        assert 0 < s.wait_ready(timeout=30) < 30
        outs = s.generate_all([{"input_ids": [1, 2, 3, 4], "rid": f"x{i}"} for i in range(3)], 3)
        assert [o["meta_info"]["id"] for o in outs] == ["x0", "x1", "x2"] and outs[0]["output_ids"] == [7, 8]
        _scenario_through(s, tmp_path)
    finally:
        s.stop(timeout=5)
    assert s.proc.returncode is not None and _gone(int(pidfile.read_text()))  # the server's children too
    dead = ct.Server(
        "dead", [sys.executable, str(script), str(port), "die", "-"], dict(os.environ), str(tmp_path), port
    )
    with pytest.raises(ct.CheckError, match=r"exited \(3\): RuntimeError: CUDA out of memory"):
        dead.wait_ready(timeout=30)
    dead.stop(timeout=5)


def _scenario_through(server, tmp_path):
    """A ring scenario's plumbing: each request's tokens are its prompt and SGLang's output ids, its
    first position SGLang's cached prefix, the counters the plugin's deltas over the scenario."""
    from aurora_sgl.transport.signal_ring import SignalRing

    handoff = tmp_path / "handoff"
    handoff.mkdir()
    (handoff / "handoff.json").write_text("{}")
    counters = handoff / "counters_dp0_rank0.json"
    counters.write_text(json.dumps({"captured": 5, "prefill_captured": 1, "capture_max_batch": 1}))
    server._handoff_dir = str(handoff)
    ring = SignalRing.create("test_dc_scenario", 8, 2, 4, 2, 1)
    reader = SignalRing.attach(ring.spec())

    def plugin_exports():  # what the scheduler exports while the requests run
        time.sleep(1.0)
        counters.write_text(json.dumps({"captured": 9, "prefill_captured": 3, "capture_max_batch": 2}))

    import threading

    t = threading.Thread(target=plugin_exports)
    t.start()
    try:
        sets = [[{"input_ids": [1, 5, 6, 7], "rid": "a"}], [{"input_ids": [1, 5, 9], "rid": "b"}]]
        sc = ct.run_scenario(server, reader, "radix hit", sets, 1)
    finally:
        t.join()
        reader.close()
        ring.close()
    assert sc.sequences == {"a": [1, 5, 6, 7, 7, 8], "b": [1, 5, 9, 7, 8]} and sc.starts == {"a": 2, "b": 1}
    assert sc.counters["captured"] == 4 and sc.counters["prefill_captured"] == 2 and sc.max_batch == 2


def test_drain_reads_until_the_ring_is_quiet():
    import threading

    from aurora_sgl.records import StepRecord, chain_outcome
    from aurora_sgl.transport.signal_ring import SignalRing

    ring = SignalRing.create("test_dc_drain", 64, 3, 4, 2, 2)
    reader = SignalRing.attach(ring.spec())

    def rec(i):
        return StepRecord(
            request_id=f"r{i}",
            position=i,
            draft_tokens=torch.zeros(2, dtype=torch.long),
            target_tokens=torch.zeros(2, dtype=torch.long),
            outcome=chain_outcome(2, 1),
            num_accepted=1,
            committed=[],
            input_tokens=torch.tensor([i, i]),
            next_tokens=torch.tensor([i, i]),
            aux_hidden=torch.zeros(2, 4),
            final_hidden=torch.zeros(2, 2),
            draft_version=1,
        )

    def writer():
        for i in range(10):
            ring.write_many([rec(i)])
            time.sleep(0.1)

    t = threading.Thread(target=writer)
    try:
        t.start()
        got = ct.drain_ring(reader, quiet_s=0.6, timeout=20)
        t.join()
        assert [r.position for r in got] == list(range(10))
    finally:
        reader.close()
        ring.close()


# ---- one check cannot take the others down ---------------------------------------------------------------
_GROUPS = textwrap.dedent("""
    import os, subprocess, sys, time

    def passes(ctx, out):
        out.row("p1", "PASS", "fine")

    def raises(ctx, out):
        out.row("r1", "PASS", "first row done")
        out.stage("the second row")
        raise RuntimeError("boom\\nsecond line")

    def hangs(ctx, out):
        server = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        open(os.path.join(ctx["log_dir"], "server.pid"), "w").write(str(server.pid))
        out.stage("waiting for a server that never answers")
        time.sleep(600)

    def dies(ctx, out):
        print("Fatal Python error: Segmentation fault (fake)", flush=True)
        os._exit(139)
""")


def test_a_check_that_raises_hangs_or_dies_is_a_fail_row_and_the_rest_go_on(tmp_path, monkeypatch):
    (tmp_path / "fake_groups.py").write_text(_GROUPS)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    groups = [
        dc.Group("hangs", "fake_groups:hangs", 15, ("h1",)),
        dc.Group("raises", "fake_groups:raises", 60, ("r1", "r2")),
        dc.Group("two", "fake_groups:passes", 60, ("t1",), min_gpus=2),
        dc.Group("dies", "fake_groups:dies", 60, ("d1",)),
        dc.Group("passes", "fake_groups:passes", 60, ("p1",)),
    ]
    ctx = {"log_dir": str(tmp_path / "logs"), "gpus": []}
    t0 = time.monotonic()
    rows = dc.run_groups(groups, ctx, 1, budget_s=600)
    assert time.monotonic() - t0 < 120
    by = {r[0]: r for r in rows}
    assert [r[0] for r in rows] == ["h1", "r1", "r2", "t1", "d1", "p1"]
    assert by["h1"][1] == "FAIL" and "timed out after 15 s (at: waiting for a server that never answers)" in by["h1"][2]
    assert _gone(int((tmp_path / "logs" / "server.pid").read_text()))  # what the hung check started
    assert by["r1"] == ("r1", "PASS", "first row done")
    assert by["r2"][1] == "FAIL" and by["r2"][2].startswith("RuntimeError: boom (at: the second row)")
    assert by["t1"] == ("t1", "skipped", "needs 2 GPUs, 1 visible")
    assert by["d1"][1] == "FAIL" and "exited with code 139: Fatal Python error" in by["d1"][2]
    assert by["p1"] == ("p1", "PASS", "fine")
    table = dc.format_table(rows).splitlines()
    assert table[0].split() == ["check", "result", "detail"] and len(table) == 7
    late = dc.run_groups(groups[-1:], ctx, 1, budget_s=30)  # too little time left to start a check
    assert late == [("p1", "FAIL", "not run: the time budget is spent")]
    assert dc.took(65) == "took 1 min 5 s" and dc.took(7) == "took 7 s"
