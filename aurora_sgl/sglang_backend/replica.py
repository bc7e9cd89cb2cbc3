"""What each scheduler process creates, by its data-parallel replica and its TP rank.

SGLang's plain data parallelism (`--dp-size N`; DP attention is refused) runs N replicas -- N groups
of TP scheduler processes, each group on its own GPUs -- and sends each request to one of them.
Every replica's TP rank 0 is its leader: it polls the weight store, marks swaps for its TP group,
and captures its replica's traffic into a signal ring of its own, on its own GPU (a ring has one
writer, and one shared ring would put a cross-GPU copy into every step). Replica 0's leader also
owns the weight store and writes the trainer's handoff (`handoff.json`); replica d >= 1's hands over
only its ring, as `ring_dp<d>.json` beside it, which the trainer's `RingSet` attaches when it
appears. Both are written once SGLang has captured its graphs (`plugin._after_cuda_graphs`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import NamedTuple

import torch

from aurora_sgl.transport.ring_set import replica_ring_file
from aurora_sgl.transport.signal_ring import SignalRing

from .capture import CaptureStaging, Sequencer
from .prefill import PrefillStaging

HANDOFF = "handoff.json"
RING_PREFIX = "aurora_ring"


@dataclass(frozen=True)
class Replica:
    dp_rank: int = 0
    tp_rank: int = 0

    @classmethod
    def of(cls, par) -> Replica:
        """From SGLang's `get_parallel()`; dp_rank is None there without a DP controller."""
        try:
            dp_rank = int(getattr(par, "dp_rank", None) or 0)
        except Exception:  # not published in this process: a single replica
            dp_rank = 0
        return cls(dp_rank, int(par.tp_rank))

    @property
    def leader(self) -> bool:
        """Polls the store, marks swaps for its TP group and captures its replica's traffic."""
        return self.tp_rank == 0

    @property
    def owner(self) -> bool:
        """Creates the weight store and writes the trainer's handoff."""
        return self.leader and self.dp_rank == 0

    @property
    def ring_prefix(self) -> str:
        return RING_PREFIX if self.dp_rank == 0 else f"{RING_PREFIX}_dp{self.dp_rank}"

    @property
    def counters_file(self) -> str:
        return f"counters_dp{self.dp_rank}_rank{self.tp_rank}.json"


class Capture(NamedTuple):
    staging: CaptureStaging | None
    prefill: PrefillStaging | None
    ring: SignalRing | None


def create_capture(
    replica: Replica,
    k: int,
    aux_dim: int,
    hidden: int,
    *,
    device: torch.device,
    dtype: torch.dtype,
    max_requests: int,
    prefill_rows: int,
    ring_records: int,
) -> Capture:
    """A leader's verify staging, prompt staging (none when `prefill_rows` <= 0) and ring; nothing
    for the other TP ranks, which see the same batches as their leader."""
    if not replica.leader:
        return Capture(None, None, None)
    order = Sequencer()  # one order over both stagings: a request's prompt records before its steps
    staging = CaptureStaging(max_requests, k, aux_dim, hidden, device=device, dtype=dtype, slots=3, sequencer=order)
    prefill = None
    if prefill_rows > 0:
        prefill = PrefillStaging(prefill_rows, k, aux_dim, hidden, device=device, dtype=dtype, slots=2, sequencer=order)
    ring = SignalRing.create(replica.ring_prefix, ring_records, k + 1, aux_dim, hidden, k, device=device)
    return Capture(staging, prefill, ring)


def handoff_of(replica: Replica, ring: SignalRing, owner_fields: dict) -> tuple[str, dict]:
    """(file name, spec) a leader hands the trainer: replica 0's carries the store and what the
    trainer starts from (`owner_fields`), another replica's only its ring."""
    if replica.owner:
        return HANDOFF, {"ring": ring.spec(), **owner_fields}
    spec = {"ring": ring.spec(), "dp_rank": replica.dp_rank, "scheduler_pid": os.getpid()}
    return replica_ring_file(replica.dp_rank), spec
