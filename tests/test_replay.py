"""The replay draw: a weighted draw without replacement, weighted towards the newest sequences."""

import math
import random
from collections import Counter
from types import SimpleNamespace

import pytest

from aurora_sgl.trainer.loop import Trainer
from aurora_sgl.trainer.replay import recency_log_weights, weighted_order
from aurora_sgl.trainer.spec import TrainerSpec


def _unattached_spec(**config):
    """A Trainer that is never set up: only its replay draw is used."""
    return TrainerSpec(ring={"name": "u"}, store={"name": "u"}, model_path="u", aux_layer_ids=[0], config=config)


def test_recency_weights_halve_every_half_life_and_are_uniform_at_zero():
    lw = recency_log_weights(5, 2.0)
    # Oldest first: the newest (index 4) weighs 1, two sequences older 1/2, four older 1/4.
    assert lw[4] == 0.0
    assert lw[2] == pytest.approx(-0.6931471805599453) and lw[0] == pytest.approx(2 * lw[2])
    assert recency_log_weights(4, 0) == [0.0] * 4
    assert recency_log_weights(0, 8.0) == []
    # A long buffer with a short half-life stays finite in logs (2^-1000 would underflow).
    assert recency_log_weights(1001, 1.0)[0] == pytest.approx(-693.147, abs=1e-3)


def _first_and_second(log_weights, draws=40_000, seed=7):
    rng = random.Random(seed)
    first, second = Counter(), Counter()
    for _ in range(draws):
        order = weighted_order(log_weights, rng)
        assert sorted(order) == list(range(len(log_weights)))  # a permutation
        first[order[0]] += 1
        second[(order[0], order[1])] += 1
    return first, second


def test_weighted_order_is_a_sequential_weighted_draw_without_replacement():
    weights = [1.0, 2.0, 3.0, 4.0]
    lw = [math.log(w) for w in weights]
    first, second = _first_and_second(lw)
    n, total = sum(first.values()), sum(weights)
    for i, w in enumerate(weights):  # the naive reference: P(first = i) = w_i / sum(w)
        assert first[i] / n == pytest.approx(w / total, abs=0.01)
    # The second pick is a weighted draw among those left: P(3 then 0) = 4/10 * 1/6.
    assert second[(3, 0)] / n == pytest.approx(0.4 / 6, abs=0.006)
    assert second[(0, 3)] / n == pytest.approx(0.1 * 4 / 9, abs=0.006)


def test_a_short_half_life_replays_the_newest_far_more_than_uniform():
    n = 64
    newest_quarter = set(range(48, 64))
    uniform, _ = _first_and_second(recency_log_weights(n, 0), draws=8000)
    recent, _ = _first_and_second(recency_log_weights(n, 8.0), draws=8000)
    share = lambda c: sum(v for i, v in c.items() if i in newest_quarter) / sum(c.values())  # noqa: E731
    assert share(uniform) == pytest.approx(0.25, abs=0.03)
    # Half-life 8: the newest 16 of 64 carry 1 - 2^-2 of the weight over 1 - 2^-8.
    assert share(recent) == pytest.approx(0.75 / (1 - 2**-8), abs=0.03)


def test_the_trainer_replays_the_newest_sequences_first_with_a_half_life():
    """replay_once draws from the buffer by recency when a half-life is set, uniformly without one.
    (Only the draw is under test: the step itself is captured instead of run.)"""
    newest_eighth = {}
    for half_life in (0.0, 4.0):
        tr = Trainer(_unattached_spec(replay_half_life=half_life, tokens_per_step=1, seed=5))
        tr.replay.extend((SimpleNamespace(tokens=[0, 0, 0], age=63 - i), None) for i in range(64))
        ages = []
        tr._train_on = lambda train, fresh=False, ages=ages: ages.extend(seq.age for seq, _ in train)
        for _ in range(2000):
            tr.replay_once()
        assert len(ages) == 2000 and tr.counters["replay_steps"] == 2000  # one sequence per step
        newest_eighth[half_life] = sum(a < 8 for a in ages) / len(ages)
    assert newest_eighth[0.0] == pytest.approx(1 / 8, abs=0.03)
    assert newest_eighth[4.0] == pytest.approx((1 - 2**-2) / (1 - 2**-16), abs=0.03)
