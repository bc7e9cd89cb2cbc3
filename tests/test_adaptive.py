"""Adaptive speculation's math (engine/adaptive.py) against naive references, and the choice it
makes on cost tables where the right answer is known."""

import random

import pytest

from aurora_sgl.engine.adaptive import (
    AcceptanceWindow,
    AdaptiveK,
    RequestAcceptance,
    StepCosts,
    bucket_of,
    calibrate,
    chain_accept_length,
    expected_tokens,
    expected_tokens_per_k,
)


def _naive_expected(rates, k):
    # E[committed] = sum over accepted counts a of P(a) * (a + 1), a chain stopping at the first reject.
    total = 0.0
    for a in range(k + 1):
        p = 1.0
        for i in range(a):
            p *= rates[i]
        if a < k:
            p *= 1 - rates[a]
        total += p * (a + 1)
    return total


def test_expected_tokens_matches_the_chain_distribution():
    rng = random.Random(0)
    for _ in range(50):
        rates = [rng.random() for _ in range(6)]
        for k in range(7):
            assert expected_tokens(rates, k) == pytest.approx(_naive_expected(rates, k))
        assert expected_tokens_per_k(rates, 6) == pytest.approx([_naive_expected(rates, k) for k in range(7)])


def test_chain_accept_length_is_the_plain_mean_when_k_is_fixed_and_unbiased_when_it_varies():
    rng = random.Random(1)
    fixed = [(4, rng.randint(0, 4)) for _ in range(200)]
    assert chain_accept_length(fixed, 4) == pytest.approx(sum(1 + a for _, a in fixed) / len(fixed))
    assert chain_accept_length([], 4) is None
    # Steps of random width from one head with known rates: the estimate at K = 4 finds E(4).
    rates = [0.8, 0.7, 0.6, 0.5]
    steps = []
    for _ in range(40000):
        d = rng.randint(1, 4)
        a = 0
        while a < d and rng.random() < rates[a]:
            a += 1
        steps.append((d, a))
    assert chain_accept_length(steps, 4) == pytest.approx(expected_tokens(rates, 4), abs=0.03)
    # The naive mean of those steps would be far lower: the reason for the estimator.
    assert sum(1 + a for _, a in steps) / len(steps) < expected_tokens(rates, 4) - 0.3


def test_acceptance_window_forgets_old_steps_and_keeps_a_light_prior_on_a_new_version():
    w = AcceptanceWindow(k_max=3, capacity=4)
    assert w.rates() == [0.5, 0.5, 0.5]  # Beta(1, 1): nothing known
    for _ in range(4):
        w.add(3, 0)  # rejected at position 1
    assert w.reached == [4, 0, 0] and w.accepted == [0, 0, 0]
    for _ in range(4):
        w.add(2, 2)  # the window now holds only these
    assert w.reached == [4, 4, 0] and w.accepted == [4, 4, 0]
    w.add(0, 0)  # a step without drafts is no evidence
    assert len(w.steps) == 4
    w.new_version()
    assert not w.steps and w.reached == [4, 4, 0]  # fewer than PRIOR_STEPS: kept whole
    big = AcceptanceWindow(k_max=1, capacity=1000)
    for _ in range(320):
        big.add(1, 1)
    big.new_version()
    assert big.reached == [32] and big.accepted == [32]


def test_step_costs_follow_measurements_and_the_machine_load():
    costs = StepCosts({(1, 0): 1.0, (1, 1): 2.0, (4, 0): 3.0, (4, 1): 5.0}, prior_weight=2)
    assert bucket_of(1, costs.buckets) == 1 and bucket_of(3, costs.buckets) == 4 and bucket_of(9, costs.buckets) == 4
    assert costs.cost(2, 1) == pytest.approx(3.0)  # interpolated between batch 1 (2.0) and 4 (5.0)
    assert costs.cost(4, 1) == 5.0 and costs.cost(9, 1) == 5.0
    costs.observe(1, 0, 100.0)  # one disturbed step: the entry keeps its two prior samples' value
    assert costs.global_ratio == 100.0 and costs.cost(1, 0) == 100.0  # ...which is the global ratio (1 sample)
    for _ in range(4):
        costs.observe(1, 0, 2.0)  # a machine twice as slow as calibrated, consistently
    assert costs.global_ratio == 2.0 and costs.cost(1, 0) == 2.0
    assert costs.cost(1, 1) == 4.0  # not measured: scaled by the global load
    costs.observe(1, 1, 20.0)  # one outlier on an entry: the median of [20, 2, 2] ignores it
    assert costs.cost(1, 1) == 4.0
    for _ in range(5):
        costs.observe(1, 1, 3.0)  # consistent samples outvote the outlier and the two prior ones
    assert costs.cost(1, 1) == 3.0
    costs.steps += costs.fresh_steps  # stale samples give way to the global ratio again
    assert costs.cost(1, 1) == 2.0 * costs.global_ratio


def test_costs_are_made_non_decreasing_in_k_by_their_evidence():
    costs = StepCosts({(1, k): 1.0 + k for k in range(4)}, prior_weight=2)
    for _ in range(9):
        costs.observe(1, 1, 2.0)  # k = 1 as calibrated, many samples
    for _ in range(3):
        costs.observe(1, 2, 1.5)  # k = 2 measured cheaper than k = 1: noise, few samples
    raw = [costs.cost(1, k) for k in range(4)]
    assert raw[2] < raw[1]
    fit = costs.costs_for(1, 3)
    assert fit == sorted(fit) and fit[0] == raw[0] and fit[3] == raw[3]
    assert fit[1] == fit[2] and raw[2] < fit[1] <= raw[1]  # pooled, nearer the better-measured k = 1


def _chooser(costs, k_max=4, explore_every=1000, warmup_steps=0, explore_share=100.0, probe_first=False):
    """A chooser whose probes come every `explore_every` steps (by default never short of budget),
    and not at the first step unless asked."""
    return AdaptiveK(
        k_max,
        StepCosts(costs),
        explore_every=explore_every,
        warmup_steps=warmup_steps,
        explore_share=explore_share,
        probe_first=probe_first,
    )


def _flat(k_max, per_k):
    return {(b, k): 1.0 + per_k * k for b in (1, 2) for k in range(k_max + 1)}


def test_adaptive_k_drafts_as_far_as_pays_and_not_at_all_for_a_useless_head():
    good = _chooser(_flat(4, 0.1))
    for _ in range(400):
        good.observe(1, 4, 1.4, [4])  # every draft accepted
    assert good.choose(1, version=0) == 4
    bad = _chooser(_flat(4, 0.1))
    for _ in range(400):
        bad.observe(1, 4, 1.4, [0])
    assert bad.choose(1, version=0) == 0
    # Free drafts: even a poor head should draft the maximum, and a dear verify none at all.
    free = _chooser(_flat(4, 0.0))
    for _ in range(400):
        free.observe(1, 4, 1.0, [0])
    assert free.choose(1, version=0) == 4
    dear = _chooser(_flat(4, 2.0))
    for _ in range(400):
        dear.observe(1, 4, 9.0, [4])
    assert dear.choose(1, version=0) == 0


def test_adaptive_k_at_zero_explores_a_full_chain_on_a_share_of_steps():
    ch = _chooser(_flat(3, 0.5), k_max=3, explore_every=4)
    for _ in range(400):
        ch.observe(1, 3, 2.5, [0])
    picks = [ch.choose(1, version=0) for _ in range(40)]
    assert picks.count(3) == 10 and picks.count(0) == 30  # 1 in 4 drafts the maximum
    assert ch.explored == 10 and ch.stats()["k_steps"] == {"0": 30, "1": 0, "2": 0, "3": 10}


@pytest.mark.parametrize("per_k,every", [(1.0, 200), (0.01, 4)])
def test_probes_are_paid_from_a_share_of_the_serving_time(per_k, every):
    # A K = 0 step costs 1, a probe at K = 4 costs 1 + 4 * per_k: with 2 % of the time to spend, a
    # probe 4 steps dearer comes every 200 steps, a cheap one as often as explore_every allows.
    ch = _chooser(_flat(4, per_k), explore_every=4, explore_share=0.02)
    for _ in range(400):
        ch.observe(1, 4, 1.0 + 4 * per_k, [0])
    picks = [ch.choose(1, version=0) for _ in range(1000)]
    assert [i + 1 for i, k in enumerate(picks) if k] == list(range(every, 1001, every))
    assert ch.stats()["explore_share"] == 0.02


def test_the_first_step_probes_a_full_chain_paid_in_advance_then_the_budget_rules():
    # Drafting costs 4 K = 0 steps, so the prior (E(4) = 1.94) chooses K = 0: the head is measured
    # at the first step, not after explore_every steps and a slowly earned 2 % budget.
    ch = _chooser(_flat(4, 0.75), explore_every=4, explore_share=0.02, probe_first=True)
    picks = [ch.choose(1, version=0) for _ in range(100)]
    assert picks[0] == 4 and picks[1:] == [0] * 99 and ch.explored == 1
    # The default engine chooser probes first; the same chooser without it waits for its budget.
    assert AdaptiveK(4, StepCosts(_flat(4, 0.75))).choose(1, version=0) == 4
    late = _chooser(_flat(4, 0.75), explore_every=4, explore_share=0.02)
    assert [late.choose(1, version=0) for _ in range(100)] == [0] * 100


def test_exploring_from_zero_finds_a_head_whose_deeper_drafts_pay_for_the_fixed_price():
    # Drafting at all costs 0.6 of a step (catch-up, verify width), each further draft 0.02: a first
    # draft accepted 40 % of the time never pays for K = 1, but chains that go on after it do.
    costs = {(1, k): 1.0 if k == 0 else 1.6 + 0.02 * k for k in range(5)}
    ch = _chooser(costs, explore_every=4)
    for i in range(20):  # the head before: first draft accepted 40 % of the time, the second never
        ch.observe(1, 4, 1.7, [int(i % 5 < 2)])
    assert ch.choose(1, version=0) == 0
    picks = []
    for i in range(120):  # now: the first draft 40 % of the time (period 5, not the explore period), then all
        k = ch.choose(1, version=0)
        picks.append(k)
        ch.observe(1, k, costs[(1, k)], [min(k, 4 * (i % 5 < 2))] if k else [])
    assert picks[-20:].count(4) >= 15  # drafting the maximum: E(4) = 2.6 tokens for 1.68 of a step


def test_exploration_also_goes_one_draft_down_so_a_dear_looking_k_is_measured_again():
    ch = _chooser(_flat(4, 0.1), explore_every=2)
    for _ in range(400):
        ch.observe(1, 4, 1.4, [4])
    picks = [ch.choose(1, version=0) for _ in range(8)]
    assert picks == [4, 3, 4, 3, 4, 3, 4, 3]  # at the maximum, exploring can only go down
    mid = _chooser({(1, k): [1.0, 1.5, 1.6, 9.0, 9.0][k] for k in range(5)}, explore_every=2)
    for _ in range(400):
        mid.observe(1, 2, 1.6, [2])
    assert [mid.choose(1, version=0) for _ in range(8)] == [2, 3, 2, 1, 2, 3, 2, 1]


def test_the_first_steps_draft_the_maximum_to_measure_the_head_and_a_pin_wins():
    ch = _chooser(_flat(4, 0.5), warmup_steps=3)
    assert [ch.choose(1, version=0) for _ in range(3)] == [4, 4, 4]
    for _ in range(100):
        ch.observe(1, 4, 3.0, [0])
    assert ch.choose(1, version=0) == 0  # measured useless: no drafting
    assert ch.choose(1, version=0, pinned=4) == 4 and ch.decode_steps == 4
    assert ch.stats()["k_steps"] == {"0": 1, "1": 0, "2": 0, "3": 0, "4": 4}


def test_request_acceptance_decays_old_steps_and_shrinks_to_the_global_rates():
    q = RequestAcceptance(3)
    glob = [0.9, 0.8, 0.7]
    assert q.rates(0, glob) == glob  # nothing of its own yet
    outcomes = [(3, 1), (2, 2), (3, 0), (1, 1)]
    for drafted, accepted in outcomes:
        q.add(0, drafted, accepted, decay=0.5)
    # Naive: step t of n weighs decay ** (n - 1 - t); a step informs the positions it reached.
    n = len(outcomes)
    reached, hit = [0.0] * 3, [0.0] * 3
    for t, (d, a) in enumerate(outcomes):
        w = 0.5 ** (n - 1 - t)
        for j in range(min(d, a + 1)):
            reached[j] += w
            hit[j] += w * (j < a)
    assert q.reached == pytest.approx(reached) and q.accepted == pytest.approx(hit)
    want = [(h + 4 * g) / (r + 4) for h, r, g in zip(hit, reached, glob)]
    assert q.rates(0, glob, prior=4) == pytest.approx(want)
    q.add(0, 0, 0, decay=0.5)  # a step without drafts changes nothing
    assert q.reached == pytest.approx(reached)
    # Another version: its outcomes were the old head's, so the request starts over.
    assert q.rates(1, glob) == glob
    q.add(1, 2, 0)
    assert q.reached == [1.0, 0.0, 0.0] and q.accepted == [0.0, 0.0, 0.0]


def test_each_request_drafts_by_its_own_outcomes_not_the_batch_average():
    costs = {(b, k): 1.0 + 0.5 * k for b in (1, 2) for k in range(5)}
    # Concurrency 1: the head drafted perfectly for the requests before; this one it cannot draft.
    ch = AdaptiveK(4, StepCosts(costs), explore_every=1000, request_prior=4, request_decay=0.9, probe_first=False)
    for _ in range(400):
        ch.observe(1, 4, 3.0, [4])
    new = RequestAcceptance(4)
    assert ch.choose(1, version=0, requests=[new]) == 4  # nothing known of it: the global rates
    picks = []
    for _ in range(8):
        k = ch.choose(1, version=0, requests=[new])
        picks.append(k)
        ch.observe(1, k, 1.0 + 0.5 * k, [0] if k else [], requests=[new])
    # Its first-position rate, 4 / (4 + sum of 0.9^i over its steps), falls below 0.5 (where no K
    # pays here) after five of its own steps.
    assert picks == [4] * 5 + [0] * 3, picks
    assert ch.choose(1, version=0) == 4  # the global rates alone still say draft everything
    # Batched: the step's K maximises the batch's expected tokens, request by request.
    good, bad = RequestAcceptance(4), RequestAcceptance(4)
    for _ in range(20):
        good.add(0, 4, 4)
        bad.add(0, 4, 0)
    glob = ch.acceptance.rates()
    per = [good.rates(0, glob), bad.rates(0, glob)]
    want = max(range(5), key=lambda k: (sum(_naive_expected(r, k) for r in per) / costs[(2, k)], -k))
    assert ch.choose(2, version=0, requests=[good, bad]) == want


def test_calibrate_times_every_bucket_and_k():
    seen = []
    table = calibrate(lambda b, k: seen.append((b, k)), k_max=2, max_batch=6, reps=2)
    assert sorted(table) == [(b, k) for b in (1, 2, 4, 6) for k in range(3)]
    assert all(v > 0 for v in table.values()) and len(seen) == 3 * len(table)


def test_calibration_fits_a_line_over_k_so_one_disturbed_sample_does_not_decide():
    # A simulated clock: a real one on a loaded CI machine disturbs every sample, not just k = 2.
    cost = {0: 1.0, 1: 2.0, 2: 9.0, 3: 4.0, 4: 5.0}  # k = 2 disturbed
    now = [0.0]

    def run_step(b, k):
        now[0] += cost[k] * 1e-3

    table = calibrate(run_step, k_max=4, max_batch=1, reps=1, clock=lambda: now[0])
    assert [table[(1, k)] for k in range(5)] == sorted(table[(1, k)] for k in range(5))  # non-decreasing in k
    # The line through (1, 2) (2, 9) (3, 4) (4, 5) puts k = 2 at 4.8 ms, not the 9 ms sampled.
    assert table[(1, 2)] == pytest.approx(4.8e-3) and table[(1, 0)] == pytest.approx(1e-3)
