"""Which already-trained sequences a replay step draws: weighted towards the newest.

A replay step fills trainer time the fresh traffic does not use. Drawn uniformly from the last
`replay_sequences` sequences, a new domain's first sequences get a replay share proportional to
their count in that buffer -- after a shift the buffer still holds the old domain for as many
requests as it is long, so most replay keeps training on traffic that has gone. Weighting each
sequence by 2^(-age / half_life) (age 0: the newest) spends the same replay budget on each sequence
over its life, but soon after it arrives, when the traffic most likely still looks like it.
"""

from __future__ import annotations

import math
import random


def recency_log_weights(n: int, half_life: float) -> list[float]:
    """Log weights of a buffer of n sequences, oldest first: -(age / half_life) ln 2; half_life 0:
    uniform. In logs, so a long buffer with a short half-life cannot underflow to weight 0."""
    if half_life <= 0:
        return [0.0] * n
    return [-(n - 1 - i) / half_life * math.log(2.0) for i in range(n)]


def weighted_order(log_weights: list[float], rng: random.Random) -> list[int]:
    """Indices in the order of a weighted draw without replacement: the first is i with probability
    w_i / sum(w), the next likewise among those left, and so on. An exponential race: index i
    finishes at E_i / w_i (E_i exponential), and the order of finishing is that draw."""
    finish = [(math.log(max(rng.expovariate(1.0), 1e-300)) - lw, i) for i, lw in enumerate(log_weights)]
    return [i for _, i in sorted(finish)]
