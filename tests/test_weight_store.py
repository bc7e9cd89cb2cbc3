"""Weight store: exact in-place swaps, checksum, the double-buffer hazard, a publisher racing the
engine from another process, segment permissions and lifetime."""

import multiprocessing as mp
import os
import time

import pytest
import torch

from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.transport.segments import SHM_DIR
from aurora_sgl.transport.weight_store import WeightStore, layout_of
from helpers import tiny_head, tiny_head_config


def _head(seed: int, hidden: int = 32, vocab: int = 60, draft_vocab: int = 24) -> Eagle3Head:
    cfg = tiny_head_config(hidden=hidden, vocab=vocab, draft_vocab=draft_vocab, aux_layer_ids=(1, 3, 4))
    torch.manual_seed(0)
    hot = torch.randperm(vocab, generator=torch.Generator().manual_seed(seed))[:draft_vocab]
    return tiny_head(cfg, torch.nn.Embedding(vocab, hidden), seed=seed, hot_ids=hot).requires_grad_(False)


@pytest.fixture
def stores():
    layout = layout_of(_head(0).serving_state())
    owner = WeightStore.create("test_ws", layout)
    other = WeightStore.attach(owner.spec())
    yield owner, other
    other.close()
    owner.close()


def test_layout_names_follow_the_checkpoint(stores):
    owner, _ = stores
    assert {"fc.weight", "midlayer.self_attn.q_proj.weight", "lm_head.weight"} <= set(owner.names)
    assert owner.layout["d2t"][1] == torch.int64 and owner.layout["t2d"][1] == torch.bool


def test_publish_poll_copy_is_bit_exact_and_in_place(stores):
    trainer, engine = stores
    src, live = _head(1), _head(2)
    objects = {n: id(t) for n, t in list(live.named_parameters()) + list(live.named_buffers())}
    ptrs = {n: t.data_ptr() for n, t in live.state_dict().items()}
    assert engine.poll(0) is None
    version = trainer.publish(src.serving_state())
    assert version == 1
    polled_version, views = engine.poll(0)
    assert polled_version == 1 and [tuple(v.shape) for v in views] == [s for s, _ in engine.layout.values()]
    assert engine.copy_into(list(live.serving_state().values()), 1)
    for name, want in src.state_dict().items():
        got = live.state_dict()[name]
        assert torch.equal(
            got.view(torch.uint8) if got.is_floating_point() else got,
            want.view(torch.uint8) if want.is_floating_point() else want,
        ), name
    assert {n: id(t) for n, t in list(live.named_parameters()) + list(live.named_buffers())} == objects
    assert {n: t.data_ptr() for n, t in live.state_dict().items()} == ptrs
    assert torch.equal(live.hot_ids, src.hot_ids)
    assert engine.poll(1) is None and engine.verify(1)


def test_publish_converts_dtypes_and_rejects_bad_state(stores):
    trainer, engine = stores
    state = {n: (t.double() if t.is_floating_point() else t) for n, t in _head(3).serving_state().items()}
    assert trainer.publish(state) == 1
    live = _head(4)
    assert engine.copy_into(list(live.serving_state().values()), 1)
    assert torch.equal(live.fc.weight, state["fc.weight"].float())
    with pytest.raises(ValueError, match="missing \\['lm_head.weight'\\]"):
        trainer.publish({n: t for n, t in state.items() if n != "lm_head.weight"})
    with pytest.raises(ValueError, match="'fc.weight' has shape"):
        trainer.publish({**state, "fc.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="layout has"):
        engine.copy_into([live.fc.weight], 1)
    assert trainer.version == 1


def test_checksum_detects_a_corrupted_byte(stores):
    trainer, engine = stores
    trainer.publish(_head(5).serving_state())
    assert engine.verify(1) and not engine.verify(2)
    _, views = engine.poll(0)
    lm_head = views[engine.names.index("lm_head.weight")]
    lm_head.view(-1).view(torch.uint8)[123] ^= 0x10
    assert not engine.verify(1)


def test_copy_fails_when_the_source_buffer_is_rewritten(stores, monkeypatch):
    trainer, engine = stores
    heads = [_head(s) for s in range(6, 10)]
    trainer.publish(heads[0].serving_state())
    live = _head(11)
    params = list(live.serving_state().values())
    real_copy = torch._foreach_copy_

    def copy_with_publishes(n):
        """The engine's copy, with `n` publishes landing after copy_into has chosen its buffer."""

        def foreach_copy(dst, src):
            if dst is params:
                for h in heads[1 : 1 + n]:
                    trainer.publish(h.serving_state())
            real_copy(dst, src)

        return foreach_copy

    # One publish writes the other buffer: the copy of version 1 is still whole.
    monkeypatch.setattr(torch, "_foreach_copy_", copy_with_publishes(1))
    assert engine.copy_into(params, 1)
    assert all(torch.equal(a, b) for a, b in zip(params, heads[0].serving_state().values()))
    # Version 1 is no longer active.
    assert not engine.copy_into(params, 1)
    # Two publishes rewrite the buffer being copied: detected.
    monkeypatch.setattr(torch, "_foreach_copy_", copy_with_publishes(2))
    assert not engine.copy_into(params, 2)
    monkeypatch.setattr(torch, "_foreach_copy_", real_copy)
    assert engine.copy_into(params, 4)
    assert all(torch.equal(a, b) for a, b in zip(params, heads[2].serving_state().values()))


def test_rollback_request_reaches_the_trainer(stores):
    trainer, engine = stores
    assert trainer.last_rollback() == 0
    engine.request_rollback(3)
    assert trainer.last_rollback() == 3
    with pytest.raises(ValueError):
        engine.request_rollback(0)


def test_segment_is_private_and_the_owner_unlinks_on_close():
    owner = WeightStore.create("test_ws", layout_of(_head(0).serving_state()))
    path = os.path.join(SHM_DIR, owner.name)
    assert os.stat(path).st_mode & 0o777 == 0o600
    other = WeightStore.attach(owner.spec())
    other.close()
    assert os.path.exists(path)
    owner.close()
    assert not os.path.exists(path)


def test_bad_layout():
    with pytest.raises(ValueError, match="empty"):
        WeightStore.create("test_ws", {})
    with pytest.raises(ValueError, match="'w'"):
        WeightStore.create("test_ws", {"w": ((2, -1), torch.float32)})


VERSIONS = 200


def _fill(version: int, dtype: torch.dtype):
    return (version % 2 == 1) if dtype == torch.bool else version


def _publisher(spec, start):
    torch.set_num_threads(1)
    store = WeightStore.attach(spec)
    state = {n: torch.empty(shape, dtype=dtype) for n, (shape, dtype) in store.layout.items()}
    start.wait()
    for v in range(1, VERSIONS + 1):
        for t in state.values():
            t.fill_(_fill(v, t.dtype))
        assert store.publish(state) == v
    store.close()


def test_engine_racing_a_publisher_only_ever_sees_whole_versions():
    live = _head(12, hidden=128, vocab=2000, draft_vocab=1000)  # ~400K params: copies overlap publishes
    params = list(live.serving_state().values())
    store = WeightStore.create("test_ws", layout_of(live.serving_state()))
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    proc = ctx.Process(target=_publisher, args=(store.spec(), start))
    proc.start()
    current, swaps, failures = 0, 0, 0
    try:
        start.set()
        deadline = time.monotonic() + 60
        while current < VERSIONS:
            if time.monotonic() > deadline or (not proc.is_alive() and store.version == current):
                break  # the publisher died: the asserts below say so
            polled = store.poll(current)
            if polled is None:
                continue
            version, _ = polled
            if not store.copy_into(params, version):
                failures += 1
                continue
            mixed = [n for n, p in zip(store.names, params) if not bool((p == _fill(version, p.dtype)).all())]
            assert not mixed, f"version {version} copied, but these tensors hold another one: {mixed}"
            current, swaps = version, swaps + 1
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
        store.close()
    assert proc.exitcode == 0
    assert current == VERSIONS and swaps >= 1
    if failures == 0:  # no copy ever overlapped a publish: the check above proved nothing (issue 17)
        pytest.skip(f"the race did not occur in this run ({swaps} swaps, no copy overlapped a publish)")
