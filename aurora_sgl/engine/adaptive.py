"""Adaptive speculation: how many tokens to draft in the next step (0..K), chosen to maximise
committed tokens per second.

Expected committed tokens per request at k drafts (a chain verify accepts a prefix):
    E(k) = 1 + sum_{j=1..k} prod_{i<=j} alpha_i,
alpha_i = P(draft i accepted | drafts 1..i-1 accepted), estimated per request: the request's own
outcomes under the served head (decayed as its text moves on), shrunk towards the rates of a
window of recent request-steps of every request (Beta(1, 1) prior there: 0.5 where nothing is
known). How well a head drafts depends on the text -- code, chat, a list -- far more than on the
time of day: with one rate for the whole batch, a request that drafts well pays for the one that
does not, and at concurrency 1 the choice lags one request behind the traffic.
A step of k drafts at batch b costs cost(b, k) seconds: calibrated once at startup with the real
forwards, then scaled by the median measured/calibrated ratio of recent steps (a loaded machine, a
long context). The choice is argmax_k (sum over the batch's requests of E_i(k)) / cost(b, k), so
K = 0 (no drafting) wins when the head is poor or the verify width is dear.

Learning must not starve at K = 0: now and then a step drafts where the choice does not, so the
served head keeps being measured and can earn its way back. From K = 0 that step drafts K (a full
chain measures every position at once: drafting at all has a fixed price -- the head's catch-up, a
wider verify -- so K = 1 can lose where K = 3 wins, and exploring one draft up from 0 would never
find it); from a choice above 0 it drafts one more, and every other time one fewer, so a K whose
cost was once over-estimated is measured again rather than avoided for good. Exploring is paid
from a budget in time, not in steps: each step earns `explore_share` of its own cost, and a probe
(at least `explore_every` steps after the last) spends what it costs over the choice. Where
drafting is dear (batch 8 on a CPU: a K = 4 step with the head's catch-up costs 3-5 K = 0 steps) a
probe every 32 steps would cost a fifth of the serving time; where it is cheap the probes come
every 32 steps. There is no warm-up at K: the prior (0.5 at every position, E(4) = 1.94) drafts from
the start where a draft is cheap, and where it is dear the first step probes, paid in advance, so
the head is measured at once (one step, not a warm-up of many on a machine where each costs 3-5).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable

PRIOR_STEPS = 32  # after a swap, the old version's rates count as this many request-steps
# A request's own outcomes against the global rates: the global rates count as REQUEST_PRIOR of its
# request-steps, and each of its drafting steps fades the older ones by REQUEST_DECAY. Chosen on
# the tuning traces (speed.py's prompts, general and code heads) by replaying K = 6 acceptance
# traces through this chooser under two cost tables, and checked on held-out streams
# (benchmarks/adaptive_replay.py; benchmarks/README.md, Adaptive K).
REQUEST_PRIOR = 2.0
REQUEST_DECAY = 0.8
# The share of decode time exploration may spend beyond what the chosen K costs (see above).
EXPLORE_SHARE = 0.02


def expected_tokens(rates: list[float], k: int) -> float:
    """E(k) = 1 + sum_{j<=k} prod_{i<=j} rates[i-1]."""
    total, run = 1.0, 1.0
    for a in rates[:k]:
        run *= a
        total += run
    return total


def expected_tokens_per_k(rates: list[float], k_max: int) -> list[float]:
    """[E(0), ..., E(k_max)] in one pass (E(k) as `expected_tokens`)."""
    out, run = [1.0], 1.0
    for a in rates[:k_max]:
        run *= a
        out.append(out[-1] + run)
    return out


def chain_accept_length(steps: list[tuple[int, int]], k: int) -> float | None:
    """The accept length a chain of k drafts would have had, from steps of any width: each
    (drafted, accepted) step informs the positions it reached. When every step drafted k this is
    exactly mean(1 + accepted), so figures stay comparable when K varies between steps."""
    reached, accepted = [0] * k, [0] * k
    for d, a in steps:
        for j in range(min(d, a + 1, k)):
            reached[j] += 1
            accepted[j] += j < a
    if not reached or not reached[0]:
        return None
    rates = [accepted[j] / reached[j] if reached[j] else 0.0 for j in range(k)]
    return expected_tokens(rates, k)


class AcceptanceWindow:
    """Per-position reached / accepted counts over the last `capacity` request-steps."""

    def __init__(self, k_max: int, capacity: int = 512):
        self.k_max = k_max
        self.steps: deque[tuple[int, int]] = deque()
        self.capacity = capacity
        self.reached = [0.0] * k_max
        self.accepted = [0.0] * k_max

    def add(self, drafted: int, accepted: int) -> None:
        if drafted <= 0:
            return
        self._count(drafted, accepted, +1)
        self.steps.append((drafted, accepted))
        if len(self.steps) > self.capacity:
            self._count(*self.steps.popleft(), -1)

    def _count(self, drafted: int, accepted: int, sign: int) -> None:
        for j in range(min(drafted, accepted + 1, self.k_max)):
            self.reached[j] += sign
            self.accepted[j] += sign * (j < accepted)

    def rates(self) -> list[float]:
        return [(a + 1.0) / (r + 2.0) for a, r in zip(self.accepted, self.reached)]

    def new_version(self) -> None:
        """A swap: forget the old version's steps but keep its rates as a light prior."""
        scale = min(1.0, PRIOR_STEPS / self.reached[0]) if self.reached and self.reached[0] else 0.0
        self.reached = [r * scale for r in self.reached]
        self.accepted = [a * scale for a in self.accepted]
        self.steps.clear()


class RequestAcceptance:
    """One request's per-position outcomes under the served draft version, older steps decayed."""

    def __init__(self, k_max: int):
        self.version: int | None = None
        self.reached = [0.0] * k_max
        self.accepted = [0.0] * k_max

    def add(self, version: int, drafted: int, accepted: int, decay: float = REQUEST_DECAY) -> None:
        if version != self.version:  # a swap: the request's outcomes were the old head's
            self.version = version
            self.reached = [0.0] * len(self.reached)
            self.accepted = [0.0] * len(self.accepted)
        if drafted <= 0:
            return
        self.reached = [r * decay for r in self.reached]
        self.accepted = [a * decay for a in self.accepted]
        for j in range(min(drafted, accepted + 1, len(self.reached))):
            self.reached[j] += 1
            self.accepted[j] += j < accepted

    def rates(self, version: int, global_rates: list[float], prior: float = REQUEST_PRIOR) -> list[float]:
        if version != self.version:
            return list(global_rates)
        return [(a + prior * g) / (r + prior) for a, r, g in zip(self.accepted, self.reached, global_rates)]


def bucket_of(batch: int, buckets: list[int]) -> int:
    for b in buckets:
        if batch <= b:
            return b
    return buckets[-1]


class StepCosts:
    """Seconds per decode step at (batch bucket, k): the startup calibration times a ratio of
    measured to calibrated time. Per entry, the ratio is the median of its recent samples together
    with `prior_weight` pseudo-samples of the global ratio (the median over every recent step), so
    one disturbed step cannot move an entry, a few consistent ones do, and an entry not chosen for
    a while follows the machine's load through the global ratio. Medians, not averages: a step's
    time on a shared machine has a long right tail (the trainer, the collector)."""

    def __init__(
        self,
        calibrated: dict[tuple[int, int], float],
        samples: int = 9,
        prior_weight: int = 2,
        fresh_steps: int = 256,
        global_window: int = 64,
    ):
        self.calibrated = calibrated
        self.buckets = sorted({b for b, _ in calibrated})
        self.prior_weight = prior_weight
        self.fresh_steps = fresh_steps
        self.samples: dict[tuple[int, int], deque] = {key: deque(maxlen=samples) for key in calibrated}
        self.recent: deque[float] = deque(maxlen=global_window)
        self.global_ratio = 1.0
        self.steps = 0

    def _fresh(self, key: tuple[int, int]) -> list[float]:
        return [r for r, step in self.samples[key] if self.steps - step < self.fresh_steps]

    def calibrated_at(self, batch: int, k: int) -> float:
        """The calibration interpolated linearly in the batch size between its buckets: a step at
        batch 9 costs less than the one calibrated at 16, and a ratio taken against the bucket's
        figure would blame K for what the batch size did."""
        hi = bucket_of(batch, self.buckets)
        lower = [b for b in self.buckets if b < hi]
        if not lower or batch >= hi:
            return self.calibrated[(hi, k)]
        lo = lower[-1]
        w = (batch - lo) / (hi - lo)
        return self.calibrated[(lo, k)] * (1 - w) + self.calibrated[(hi, k)] * w

    def cost(self, batch: int, k: int) -> float:
        return self._estimate(batch, k)[0]

    def _estimate(self, batch: int, k: int) -> tuple[float, int]:
        """(seconds, evidence): the calibration times the median ratio of the entry's fresh samples
        and `prior_weight` pseudo-samples of the global ratio; evidence counts them all."""
        fresh = self._fresh((bucket_of(batch, self.buckets), k))
        ratio = _median(fresh + [self.global_ratio] * self.prior_weight)
        return self.calibrated_at(batch, k) * ratio, len(fresh) + self.prior_weight

    def costs_for(self, batch: int, k_max: int) -> list[float]:
        """cost(batch, k) for k = 0..k_max, made non-decreasing in k (a wider step never costs
        less) by pooling adjacent violators, each entry weighted by its evidence: a K whose few
        samples came out cheaper than a smaller K's many is pulled up to it, not chosen for it."""
        values, weights = zip(*(self._estimate(batch, k) for k in range(k_max + 1)))
        return _non_decreasing(list(values), list(weights))

    def observe(self, batch: int, k: int, seconds: float) -> None:
        key = (bucket_of(batch, self.buckets), k)
        r = seconds / self.calibrated_at(batch, k)
        self.steps += 1
        self.samples[key].append((r, self.steps))
        self.recent.append(r)
        self.global_ratio = _median(list(self.recent))

    def table(self) -> dict:
        return {
            "global_ratio": round(self.global_ratio, 4),
            "ms": {
                f"b{b}_k{k}": round(c * 1e3, 3)
                for b in self.buckets
                for k, c in enumerate(self.costs_for(b, max(k for _, k in self.calibrated)))
            },
        }


def _non_decreasing(values: list[float], weights: list[float]) -> list[float]:
    """Weighted least-squares non-decreasing fit (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            v2, w2, n2 = blocks.pop()
            v1, w1, n1 = blocks.pop()
            blocks.append([(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [mean for mean, _, n in blocks for _ in range(n)]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


class AdaptiveK:
    """The per-step choice of K (0..k_max) for the embedded engine."""

    def __init__(
        self,
        k_max: int,
        costs: StepCosts,
        explore_every: int = 32,
        window: int = 512,
        warmup_steps: int = 0,
        request_prior: float = REQUEST_PRIOR,
        request_decay: float = REQUEST_DECAY,
        explore_share: float = EXPLORE_SHARE,
        probe_first: bool = True,
    ):
        self.k_max = k_max
        self.request_prior, self.request_decay = request_prior, request_decay
        self.costs = costs
        self.explore_every = explore_every
        self.explore_share = explore_share
        self.explore_credit = 0.0  # seconds of probing earned and not yet spent
        self.since_probe = 0
        if probe_first:
            # The first step may probe, paid in advance (the cap in _probe makes it one full chain's
            # worth): where the prior says K = 0, the head and the real price of drafting are
            # measured at once instead of after explore_every steps and a slowly earned budget.
            self.explore_credit, self.since_probe = math.inf, explore_every
        self.warmup_steps = warmup_steps
        self.acceptance = AcceptanceWindow(k_max, window)
        self.version: int | None = None
        self.decode_steps = 0
        self.explored = 0
        self.k_counts = [0] * (k_max + 1)  # decode steps per chosen K, since start

    def choose(
        self,
        batch: int,
        version: int,
        pinned: int | None = None,
        requests: list[RequestAcceptance] | None = None,
    ) -> int:
        """K for the next step at this batch size; `pinned` overrides the choice (still counted).
        `requests`: the batch's requests' own outcomes (without them, every request drafts at the
        global rates)."""
        if version != self.version:
            if self.version is not None:
                self.acceptance.new_version()
            self.version = version
        if pinned is not None:
            self.k_counts[pinned] += 1
            return pinned
        self.decode_steps += 1
        if self.decode_steps <= self.warmup_steps:
            best = self.k_max
        else:
            rates = self.acceptance.rates()
            per_request = [q.rates(version, rates, self.request_prior) for q in requests] if requests else [rates]
            cost = self.costs.costs_for(batch, self.k_max)
            tokens = [sum(col) for col in zip(*(expected_tokens_per_k(r, self.k_max) for r in per_request))]
            best = max(range(self.k_max + 1), key=lambda k: (tokens[k] / cost[k], -k))
            best = self._probe(best, cost)
        self.k_counts[best] += 1
        return best

    def _probe(self, best: int, cost: list[float]) -> int:
        """`best`, or the K to measure instead when the exploration budget allows it."""
        # Earned per step, capped so that a long stretch without probes does not buy a burst of them.
        self.explore_credit = min(self.explore_credit + self.explore_share * cost[best], cost[self.k_max])
        self.since_probe += 1
        if self.since_probe < self.explore_every:
            return best
        if best == 0:
            probe = self.k_max
        else:
            probe = best - 1 if best == self.k_max or self.explored % 2 == 1 else best + 1
        price = max(0.0, cost[probe] - cost[best])
        if price > self.explore_credit:
            return best
        self.explore_credit -= price
        self.since_probe = 0
        self.explored += 1
        return probe

    def observe(
        self,
        batch: int,
        k: int,
        seconds: float,
        accepted: list[int],
        requests: list[RequestAcceptance] | None = None,
    ) -> None:
        """A decode step's time and, per request (in `requests`' order), its accepted drafts."""
        self.costs.observe(batch, k, seconds)
        for a in accepted:
            self.acceptance.add(k, a)
        if requests and k:
            for q, a in zip(requests, accepted):
                q.add(self.version, k, a, self.request_decay)

    def stats(self) -> dict:
        rates = self.acceptance.rates()
        return {
            "k_max": self.k_max,
            "k_steps": {str(k): n for k, n in enumerate(self.k_counts)},
            "explore_every": self.explore_every,
            "explore_share": self.explore_share,
            "explored_steps": self.explored,
            "request_prior": self.request_prior,
            "request_decay": self.request_decay,
            "accept_rate_per_position": [round(a, 4) for a in rates],
            "expected_tokens_per_k": [round(e, 4) for e in expected_tokens_per_k(rates, self.k_max)],
            "step_cost": self.costs.table(),
        }


def calibrate(
    run_step: Callable[[int, int], None],
    k_max: int,
    max_batch: int,
    reps: int = 2,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Time `run_step(batch, k)` (one synthetic decode step) for every batch bucket (powers of two
    up to max_batch, and max_batch) and k in 0..k_max: the fastest of `reps` after one warm-up
    (interference only ever adds time). Per bucket, the drafting steps (k >= 1) are then fitted by
    a line in k -- k draft steps plus a verify of width k + 1 grow about linearly in k on a CPU and
    a GPU alike -- so one disturbed sample cannot make a K look cheap or dear."""
    buckets = sorted({min(2**i, max_batch) for i in range(int(math.log2(max_batch)) + 2)})
    out = {}
    for b in buckets:
        for k in range(k_max + 1):
            run_step(b, k)
            samples = []
            for _ in range(reps):
                t0 = clock()
                run_step(b, k)
                samples.append(clock() - t0)
            out[(b, k)] = max(min(samples), 1e-6)
        if k_max >= 2:
            ks = list(range(1, k_max + 1))
            slope, intercept = _line([float(k) for k in ks], [out[(b, k)] for k in ks])
            for k in ks:
                out[(b, k)] = max(intercept + slope * k, out[(b, 0)], 1e-6)
    return out


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope (at least 0: a wider step never costs less) and intercept."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = max(0.0, sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var) if var else 0.0
    return slope, my - slope * mx
