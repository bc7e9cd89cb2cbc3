"""An exponential moving average of a head's weights, the head the trainer serves.

At the learning rate online training needs to follow a shift in a few hundred steps, each step's
weights scatter around where the traffic pulls them: the guardrail saw the training head score
0.2-0.3 of accept length below a snapshot it had published 30-80 steps before, on the traffic it
was training on. The average of the recent iterates sits nearer the middle of that scatter, and a
half-life of a few steps lags the traffic by less than one publish period.
"""

from __future__ import annotations

import torch


def decay_for_half_life(steps: float) -> float:
    """The per-step weight of the old average that halves its share every `steps` steps."""
    if steps <= 0:
        raise ValueError(f"half-life must be positive, got {steps!r}")
    return 2.0 ** (-1.0 / steps)


@torch.no_grad()
def update_average(average: torch.nn.Module, current: torch.nn.Module, decay: float) -> None:
    """average <- decay * average + (1 - decay) * current, parameter by parameter (buffers -- the
    draft vocabulary -- are the trainer's to set on both)."""
    for (name, avg), (other, cur) in zip(average.named_parameters(), current.named_parameters(), strict=True):
        if name != other:
            raise ValueError(f"parameters differ: {name} vs {other}")
        avg.lerp_(cur, 1.0 - decay)
