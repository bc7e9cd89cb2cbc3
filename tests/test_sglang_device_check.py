"""The SGLang device check's pieces on CPU (`launch/device_check.sh --sglang`; the check itself
needs GPUs): the plugin counters it reads, the ring-vs-recompute comparison on records of the
embedded engine, the command lines of its launches (SGLang's own parse), and its isolation of one
check from the next (a check that hangs, raises or dies is a FAIL row and the rest go on)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from aurora_sgl import reference_head_path, reference_model_path
from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.sglang_backend.recompute import REL_TOL, compare, eager_states
from aurora_sgl.sglang_backend.swap_facts import (
    differences,
    expected_params,
    hot_digest,
    row_fingerprint,
    sglang_layout,
)


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
        first = json.loads((tmp_path / "counters_rank0.json").read_text())
        assert first["hot_is_worker_tensor"] is None  # nothing bound before the first swap
        assert first["swap_facts"]["version"] == 1
        assert differences(first["swap_facts"], expected_params(served.serving_state()), None) == []
        state, hot = _permuted(served)
        version = store.publish(state)
        assert rt.swap_to(version)
        rt.export_counters()
        c = json.loads((tmp_path / "counters_rank0.json").read_text())
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
    c = json.loads((tmp_path / "counters_rank0.json").read_text())
    assert "swap_facts_error" in c and not rt.broken
    rt._last_export = 0.0
    rt.iteration()
    assert "swap_facts_error" in json.loads((tmp_path / "counters_rank0.json").read_text())


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
