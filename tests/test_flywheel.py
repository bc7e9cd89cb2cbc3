"""Engine side of the flywheel: in-place swaps from the weight store while generating, refusal of
garbage, live rollback, and a ring nobody reads. Outputs must stay exact through all of it."""

import threading
import time

import pytest
import torch

from aurora_sgl.engine.engine import Engine
from aurora_sgl.engine.sampling import SamplingParams
from aurora_sgl.online.flywheel import Flywheel
from aurora_sgl.records import StepRecord
from aurora_sgl.transport.signal_ring import SignalRing
from aurora_sgl.transport.weight_store import WeightStore, layout_of
from helpers import MAX_NEW, PROMPTS, chi_square, exact_two_token_dist


@pytest.fixture(scope="module")
def reference(tiny_model, ref_tokenizer):
    eng = Engine(model=tiny_model, tokenizer=ref_tokenizer, num_speculative_steps=0, max_running_requests=8)
    return [o["output_ids"] for o in eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))]


@pytest.fixture
def closing():
    """Segments to close after the test's report is made: a failing assertion's report may show
    tensors that view them, and a closed mapping must not be read."""
    owned = []
    yield owned
    for seg in owned:
        seg.close()


def _setup(closing, tiny_model, tok, head_dir=None, ring_capacity=None, **kw):
    eng = Engine(
        model=tiny_model, tokenizer=tok, num_speculative_steps=3, max_running_requests=8, draft_model_path=head_dir
    )
    store = WeightStore.create("aurora_test_store", layout_of(eng.head.serving_state()))
    ring = None
    if ring_capacity:
        h = tiny_model.config.hidden_size
        ring = SignalRing.create("aurora_test_ring", ring_capacity, 8, 3 * h, h, 3)
    closing += [x for x in (ring, store) if x is not None]
    return eng, store, ring, Flywheel(eng, ring, store, **kw)


def test_1000_swaps_during_generation_never_mix_versions(closing, tiny_model, ref_tokenizer, tiny_head_dir, reference):
    eng, store, _, fw = _setup(closing, tiny_model, ref_tokenizer, tiny_head_dir)
    base = {k: v.clone() for k, v in eng.head.serving_state().items()}
    fills = {}
    stop = threading.Event()

    def publisher():
        i = 0
        while not stop.is_set():
            i += 1
            fill = (i % 997) * 1e-3
            state = {k: (torch.full_like(v, fill) if v.is_floating_point() else v) for k, v in base.items()}
            fills[store.version + 1] = fill  # before the publish: a swap may see the version at once
            assert store.publish(state) in fills

    seen = set()
    original_swap = fw._swap

    def checked_swap(version, views):
        original_swap(version, views)
        if eng.draft_version == fw.confirmed_version:
            # Every retry found the source rewritten mid-copy: the confirmed weights came back.
            for p, c in zip(fw.params, fw.confirmed):
                assert torch.equal(p, c), "restored parameters differ from the confirmed version"
            restored[0] += 1
            return
        floats = [p for p in fw.params if p.is_floating_point()]
        values = torch.cat([p.flatten() for p in floats]).unique()
        assert values.numel() == 1, "live parameters mix two versions"
        assert values[0] == torch.tensor(fills[eng.draft_version], dtype=values.dtype)
        seen.add(eng.draft_version)

    restored = [0]
    fw._swap = checked_swap
    t = threading.Thread(target=publisher, daemon=True)
    t.start()
    try:
        outs = []
        started = time.perf_counter()
        while fw.swaps < 1000:
            outs += eng.generate(PROMPTS[:8], SamplingParams(max_new_tokens=MAX_NEW))
        elapsed = time.perf_counter() - started
    finally:
        stop.set()
        t.join()
    assert fw.swaps >= 1000 and len(seen) >= 100
    for i, o in enumerate(outs):
        assert o["output_ids"] == reference[i % 8]
    # one pause per swap, each measured inside the generation it paused
    assert len(fw.swap_pauses) == min(fw.swaps, fw.swap_pauses.maxlen)
    assert 0 < sum(fw.swap_pauses) < elapsed


def test_nan_and_corrupt_versions_are_refused(closing, tiny_model, ref_tokenizer, tiny_head_dir, reference):
    eng, store, _, fw = _setup(closing, tiny_model, ref_tokenizer, tiny_head_dir)
    good = {k: v.clone() for k, v in eng.head.serving_state().items()}
    nan = {k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in good.items()}
    v1 = store.publish(nan)
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    assert [o["output_ids"] for o in outs] == reference
    assert fw.refused == 1 and eng.draft_version == 0 and store.last_rollback() == v1
    assert all(torch.isfinite(p).all() for p in fw.params if p.is_floating_point())
    # A buffer corrupted after publishing fails its checksum.
    v2 = store.publish(good)
    active = store._views[int(store._h[4])]  # poke the active buffer behind the store's back
    active[store.names.index("fc.weight")].view(-1)[0] += 1.0
    eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4))
    assert fw.refused == 2 and store.last_rollback() == v2
    # A good version after that is taken.
    v3 = store.publish(good)
    eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4))
    assert eng.draft_version == v3 and fw.swaps == 1


def test_nan_weights_in_the_engine_keep_sampling_exact(tiny_model, ref_tokenizer, reference):
    """Even if NaN weights reached the head, greedy outputs equal target-only decoding and sampled
    outputs follow the target's distribution (issue 17: the old check of lengths and id ranges passed
    with the engine's NaN guard removed, while every token after the first was the last vocabulary id)."""
    eng = Engine(model=tiny_model, tokenizer=ref_tokenizer, num_speculative_steps=3, max_running_requests=16)
    with torch.no_grad():
        for p in eng.head.parameters():
            p.fill_(float("nan"))
    greedy = eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    assert [o["output_ids"] for o in greedy] == reference
    params = dict(max_new_tokens=2, temperature=0.9, top_k=3, ignore_eos=True)
    exact = exact_two_token_dist(tiny_model, ref_tokenizer, PROMPTS[0], SamplingParams(**params))
    n = 900
    outs = eng.generate([PROMPTS[0]] * n, [SamplingParams(seed=s, **params) for s in range(n)])
    counts: dict = {}
    for o in outs:
        counts[tuple(o["output_ids"])] = counts.get(tuple(o["output_ids"]), 0) + 1
    assert set(counts) <= set(exact)
    chi2, cells = chi_square(counts, exact, n)
    assert chi2 < 27.9, (chi2, cells)  # df <= 8 at p = 0.001


def test_live_rollback_restores_the_confirmed_head(closing, tiny_model, ref_tokenizer, tiny_head_dir, reference):
    eng, store, _, fw = _setup(closing, tiny_model, ref_tokenizer, tiny_head_dir, window=64, margin=0.2)
    trained = {k: v.clone() for k, v in eng.head.serving_state().items()}
    # Version 1: the trained head itself, confirmed after a window of good acceptance.
    store.publish(trained)
    eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    assert fw.confirmed_version == 1
    good_tau = fw.live_accept_length(1)
    # Version 2: random weights, accepted by the checks (finite) but bad in live traffic.
    gen = torch.Generator().manual_seed(0)
    bad = {k: (torch.randn(v.shape, generator=gen) if v.is_floating_point() else v) for k, v in trained.items()}
    v2 = store.publish(bad)
    outs = []
    for _ in range(6):  # a window on version 2, then a window re-measuring version 1
        outs += eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    assert [o["output_ids"] for o in outs] == reference * 6
    assert fw.rollbacks == 1 and store.last_rollback() == v2 and eng.draft_version == 1, (good_tau, str(fw.stats()))
    for name, p in eng.head.serving_state().items():
        assert torch.equal(p, trained[name]), name
    # The restored head accepts as before.
    eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    assert fw.live_accept_length(1) > good_tau - 0.2


def _serve(fw, eng, n, accepted):
    """n verify steps of the serving version that accepted `accepted` drafts each: what the engine
    hands the flywheel after its steps, and the hook it calls before the next one."""
    z = torch.zeros(0, dtype=torch.long)
    fw.record_sink(
        [
            StepRecord(
                "r",
                0,
                z,
                z,
                z.to(torch.int8),
                accepted,
                [],
                z,
                z,
                torch.zeros(0, 1),
                torch.zeros(0, 1),
                eng.draft_version,
            )
            for _ in range(n)
        ]
    )
    fw.before_step(eng)


@pytest.mark.parametrize("old_on_new_traffic,kept", [(2, True), (4, False)])
def test_a_suspect_version_is_judged_on_the_same_traffic(
    closing, tiny_model, ref_tokenizer, tiny_head_dir, old_on_new_traffic, kept
):
    """Version 1 is measured on easy traffic (tau 4); version 2 then serves tau 2. Version 1 comes
    back for one window: if it also drafts tau 2 on this traffic, the traffic changed, not the
    weights, and version 2 returns; if it still drafts tau 4, version 2 is rolled back."""
    eng, store, _, fw = _setup(closing, tiny_model, ref_tokenizer, tiny_head_dir, window=16, margin=0.2)
    v1_state = {k: v.clone() for k, v in eng.head.serving_state().items()}
    v2_state = {k: (v * 0.5 if v.is_floating_point() else v) for k, v in v1_state.items()}
    store.publish(v1_state)
    fw.before_step(eng)
    _serve(fw, eng, 16, 3)
    assert fw.confirmed_version == 1
    v2 = store.publish(v2_state)
    fw.before_step(eng)
    assert eng.draft_version == v2
    _serve(fw, eng, 16, 1)
    assert fw.probes == 1 and eng.draft_version == 1  # re-measuring version 1
    for name, p in eng.head.serving_state().items():
        assert torch.equal(p, v1_state[name]), name
    _serve(fw, eng, 8, old_on_new_traffic - 1)
    assert eng.draft_version == 1 and store.poll(1) is not None  # no swap while the probe runs
    _serve(fw, eng, 8, old_on_new_traffic - 1)
    expected = v2_state if kept else v1_state
    assert (fw.confirmed_version, fw.rollbacks, store.last_rollback()) == ((v2, 0, 0) if kept else (1, 1, v2))
    assert eng.draft_version == fw.confirmed_version
    for name, p in eng.head.serving_state().items():
        assert torch.equal(p, expected[name]), name


def test_a_new_version_is_compared_with_more_than_the_confirmed_versions_last_window(
    closing, tiny_model, ref_tokenizer, tiny_head_dir
):
    """The confirmed version drafted well for many steps, then a low tail (the last tokens of a
    few requests). A useless new version must not pass the margin against that tail alone."""
    eng, store, _, fw = _setup(closing, tiny_model, ref_tokenizer, tiny_head_dir, window=16, margin=0.25)
    v1_state = {k: v.clone() for k, v in eng.head.serving_state().items()}
    store.publish(v1_state)
    fw.before_step(eng)
    _serve(fw, eng, 96, 3)
    _serve(fw, eng, 16, 0)  # the tail: one window at tau 1
    assert fw.confirmed_version == 1
    store.publish({k: (v * 0.5 if v.is_floating_point() else v) for k, v in v1_state.items()})
    fw.before_step(eng)
    assert eng.draft_version == 2
    _serve(fw, eng, 16, 0)  # as poor as the tail, far below version 1's record
    assert fw.probes == 1 and eng.draft_version == 1 and fw.confirmed_version == 1


def test_unread_full_ring_never_blocks_and_counts_drops(closing, tiny_model, ref_tokenizer, reference):
    eng, store, ring, fw = _setup(closing, tiny_model, ref_tokenizer, ring_capacity=16)
    reader = SignalRing.attach(ring.spec())  # a trainer that attached, then stalled
    closing.insert(0, reader)
    outs = eng.generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))
    assert [o["output_ids"] for o in outs] == reference
    written = ring.stats()["written"]
    assert written > 16
    got = reader.read(1000)
    assert len(got) == 16 and reader.stats()["drops"] == written - 16


def test_version_check_sums_without_a_float32_copy(monkeypatch):
    # Issue 13: `.float().sum()` made an fp32 copy of every tensor after SGLang had sized GPU memory.
    from aurora_sgl.online.version_check import refusal_reason
    from aurora_sgl.transport.weight_store import WeightStore, layout_of

    state = {"w": torch.full((64, 64), 60000.0, dtype=torch.bfloat16), "d2t": torch.zeros(4, dtype=torch.long)}
    store = WeightStore.create("test_vc", layout_of(state))
    try:
        version = store.publish(state)
        _, views = store.poll(0)

        def no_copy(self, *a, **k):
            raise AssertionError("a float32 copy of a published tensor")

        monkeypatch.setattr(torch.Tensor, "float", no_copy)
        assert refusal_reason(store, version, views) is None  # 64*64*6e4 overflows bf16, not fp32
        monkeypatch.undo()
        state["w"][0, 0] = float("nan")
        version = store.publish(state)
        _, views = store.poll(0)
        assert refusal_reason(store, version, views) == "non-finite weights"
    finally:
        store.close()
