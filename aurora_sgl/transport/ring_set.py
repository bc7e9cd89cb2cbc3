"""The trainer's read side over several signal rings: one per SGLang data-parallel replica.

Each replica's leader writes its own ring (one writer per ring). Replica 0's ring comes with the
trainer's spec; replica d >= 1 hands its ring over as `ring_dp<d>.json` (`transport.handoff`, so
CUDA IPC handles come along) in a directory the set polls. Replicas finish starting independently,
so such a file can appear after the trainer started: the directory is listed at most every
`poll_s` seconds and each file is attached once.

`read` and `stats` are `SignalRing`'s. Records keep their ring's sequence numbers and say which ring
they came from (`RingRecord.source`): sequence numbers of different rings are not comparable, and
the stitcher's rule for a request gone quiet counts records per ring. One request lives on one
replica and each ring is read in order, so a request's records keep their order however the rings'
records interleave.
"""

from __future__ import annotations

import glob
import logging
import os
import time

from aurora_sgl.transport.handoff import read_handoff
from aurora_sgl.transport.signal_ring import RingRecord, SignalRing

log = logging.getLogger("aurora_sgl.transport")

REPLICA_RINGS = "ring_dp*.json"


def replica_ring_file(dp_rank: int) -> str:
    """The file name replica `dp_rank` (>= 1) hands its ring over in."""
    return f"ring_dp{dp_rank}.json"


class RingSet:
    """`primary` plus the rings whose specs appear in `directory` (None: the primary only)."""

    def __init__(self, primary: SignalRing, directory: str | None = None, poll_s: float = 1.0, clock=time.monotonic):
        self.rings = [primary]
        self.directory, self.poll_s, self._clock = directory, poll_s, clock
        self._seen: set[str] = set()  # spec files tried, attached or not
        self._next_poll = float("-inf")
        self._turn = 0

    def _discover(self) -> None:
        if self.directory is None or self._clock() < self._next_poll:
            return
        self._next_poll = self._clock() + self.poll_s
        names = {r.name for r in self.rings}
        for path in sorted(glob.glob(os.path.join(self.directory, REPLICA_RINGS))):
            if path in self._seen:
                continue
            self._seen.add(path)  # a spec is written atomically: one try is enough
            try:
                spec = read_handoff(path)["ring"]
                if spec["name"] in names:
                    continue
                self.rings.append(SignalRing.attach(spec))
                names.add(spec["name"])
                log.info("reading the ring in %s too (%d rings)", os.path.basename(path), len(self.rings))
            except (OSError, ValueError, KeyError, TypeError) as e:  # its replica went away meanwhile
                log.warning("cannot attach the ring in %s: %s", path, e)

    def read(self, max_records: int) -> list[RingRecord]:
        """Up to `max_records` new records: first an equal share from every ring, then whatever is
        left from the rings that had more, starting one ring further each call, so a busy ring
        never starves the others."""
        if not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be a positive integer, got {max_records!r}")
        self._discover()
        n = len(self.rings)
        order = [(self._turn + j) % n for j in range(n)]
        self._turn = (self._turn + 1) % n
        share = max(1, max_records // n)
        out: list[RingRecord] = []
        full = []
        for i in order:
            want = min(share, max_records - len(out))
            if want < 1:
                break
            got = self._read_one(i, want)
            out += got
            if len(got) == want:
                full.append(i)
        for i in full:
            if len(out) >= max_records:
                break
            out += self._read_one(i, max_records - len(out))
        return out

    def _read_one(self, i: int, n: int) -> list[RingRecord]:
        records = self.rings[i].read(n)
        for r in records:
            r.source = i
        return records

    def stats(self) -> dict[str, int]:
        """`SignalRing.stats` summed over the rings, and how many there are."""
        out = {"written": 0, "drops": 0, "truncated": 0}
        for ring in self.rings:
            for k, v in ring.stats().items():
                out[k] = out.get(k, 0) + v
        out["rings"] = len(self.rings)
        return out

    def close(self) -> None:
        for ring in self.rings:
            ring.close()
