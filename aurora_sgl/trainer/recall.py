"""Recall: a small library of earlier heads, so that traffic returning to a domain gets back the
head that had learned it instead of waiting for the training head to learn it again.

An online head follows the traffic it trains on: after a shift it learns the new domain within
tens of requests, and in doing so forgets the old one (the first window after every shift in
benchmarks/README.md, "recall", falls to about a random head's level, even when the head the trainer
started from was a specialist of the new traffic). The library keeps the head the trainer started
from (pinned: it holds what offline training knew) and the served head of each domain the traffic
left (a *shift*: the training head's simulated accept length on the newest sequences falls well
below its level on the sequences before them). At each publish round the library is scored on the
newest sequences; a head far enough ahead of the training head is copied into it (training goes
on from there), and the head it replaces goes into the library.

Pure bookkeeping here; the trainer (`loop.Trainer`) scores and loads heads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from aurora_sgl.trainer.guardrail import mean_of_sums


@dataclass
class LibraryHead:
    state: dict[str, torch.Tensor]  # a snapshot: never changed in place
    origin: str  # "start", "shift" or "replaced"
    pinned: bool = False


class HeadLibrary:
    """At most `capacity` heads; pinned ones are never evicted, the oldest unpinned one is."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.heads: list[LibraryHead] = []

    def __len__(self) -> int:
        return len(self.heads)

    def add(self, state: dict[str, torch.Tensor], origin: str, pinned: bool = False) -> bool:
        """Keep a copy of `state`; False when there is no room (capacity 0, or all pinned)."""
        if self.capacity <= 0:
            return False
        while len(self.heads) >= self.capacity:
            oldest = next((i for i, h in enumerate(self.heads) if not h.pinned), None)
            if oldest is None:
                return False
            del self.heads[oldest]
        self.heads.append(LibraryHead({k: v.detach().clone() for k, v in state.items()}, origin, pinned))
        return True


def shift_detected(prequential: Sequence[tuple[float, int]], window: int, drop: float) -> bool:
    """True when the newest `window` sequences score below (1 - drop) x the sequences before them
    (at least `window` of those): the traffic moved to something the head does not know."""
    if len(prequential) < 2 * window:
        return False
    newest, before = mean_of_sums(prequential[-window:]), mean_of_sums(prequential[:-window])
    return newest is not None and before is not None and newest[0] < (1.0 - drop) * before[0]
