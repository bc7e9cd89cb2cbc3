"""The served moving average of the training weights (TrainerConfig.average_half_life): the math
against a naive loop, and the live trainer publishing the average of its own iterates."""

import pytest
import torch

from aurora_sgl.trainer.loop import Trainer
from aurora_sgl.trainer.spec import TrainerSpec
from aurora_sgl.training.averaging import decay_for_half_life, update_average
from helpers import tiny_head, tiny_head_config
from test_trainer import _store_state, make_rig, model, model_dir, published  # noqa: F401 (fixtures)


def _small_head(seed):
    return tiny_head(tiny_head_config(hidden=16, heads=2, kv_heads=1, vocab=40, draft_vocab=8), seed=seed)


def test_decay_halves_the_old_share_every_half_life():
    d = decay_for_half_life(8)
    assert d**8 == pytest.approx(0.5)
    assert decay_for_half_life(1) == 0.5
    for bad in (0, -1):
        with pytest.raises(ValueError, match="half-life"):
            decay_for_half_life(bad)


def test_update_average_matches_the_naive_weighted_sum():
    avg, cur = _small_head(0), _small_head(1)
    start = {n: p.detach().clone() for n, p in avg.named_parameters()}
    d = decay_for_half_life(3)
    iterates = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        with torch.no_grad():
            for p in cur.parameters():
                p.add_(torch.randn(p.shape, generator=gen))
        iterates.append({n: p.detach().clone() for n, p in cur.named_parameters()})
        update_average(avg, cur, d)
    for name, p in avg.named_parameters():
        # a_5 = d^5 a_0 + sum_t (1 - d) d^(5 - t) h_t
        naive = d**5 * start[name] + sum((1 - d) * d ** (5 - t) * it[name] for t, it in enumerate(iterates, 1))
        assert torch.allclose(p, naive, atol=1e-5), name
    # Buffers (the draft vocabulary) are not averaged.
    assert torch.equal(avg.d2t, _small_head(0).d2t)


def test_rollback_and_vocab_refresh_carry_the_average_along():
    tr = Trainer(TrainerSpec(ring={"name": "u"}, store={"name": "u"}, model_path="u", aux_layer_ids=[0]))
    tr.head, tr.avg_head = _small_head(0), _small_head(1)
    tr.vocab_size, tr.device, tr.lr = 40, torch.device("cpu"), 1e-3
    tr.opt = tr._new_optimizer()
    assert tr.candidate_head is tr.avg_head
    w0 = tr.avg_head.lm_head.weight.detach().clone()
    tr.counts = torch.zeros(40, dtype=torch.float64)
    tr.counts[[0, 1, 2, 3, 4, 5, 20, 21]] = 10.0
    assert tr.refresh_vocab()
    assert tr.avg_head.hot_ids.tolist() == [0, 1, 2, 3, 4, 5, 20, 21]
    w = tr.avg_head.lm_head.weight.detach()
    assert torch.equal(w[:6], w0[:6]) and not w[6:].any()
    # A rollback loads a served state into the training head: the average restarts from it too.
    state = _small_head(2).serving_state()
    tr._load_into_head(state)
    for name, p in tr.avg_head.serving_state().items():
        assert torch.equal(p, state[name]), name


def test_the_live_trainer_publishes_the_average_of_its_iterates(make_rig, published, monkeypatch):  # noqa: F811
    """Real engine -> ring -> trainer -> store: every version the trainer publishes is its moving
    average at that moment (not the training head), and the final average is the naive weighted
    sum of the iterates the steps produced."""
    import aurora_sgl.trainer.loop as loop

    iterates, averages = [], []
    real = loop.update_average

    def spy(average, current, decay):
        real(average, current, decay)
        iterates.append(current.fc.weight.detach().clone())
        averages.append(average.fc.weight.detach().clone())

    monkeypatch.setattr(loop, "update_average", spy)
    rig = make_rig()
    _, v1 = _store_state(rig.store)
    rig.start(rig.spec(lr=3e-3, tokens_per_step=64, publish_every=2, unroll=3, margin=10.0, average_half_life=4))
    assert rig.drive(lambda: rig.snap()["publishes"] >= 3)
    rig.finish()
    ours = [st["fc.weight"] for v, st in published if v >= 2]
    assert len(ours) >= 3
    for fc in ours:  # each published version is one of the averages, never a training iterate
        assert any(torch.equal(fc, a) for a in averages)
        assert not any(torch.equal(fc, h) for h in iterates)
    d = decay_for_half_life(4)
    naive = v1["fc.weight"].float()
    for h in iterates:
        naive = d * naive + (1 - d) * h
    assert torch.allclose(rig.trainer.avg_head.fc.weight, naive, atol=1e-5)
