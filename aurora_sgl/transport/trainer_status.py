"""The trainer's status: a small shared-memory segment the trainer writes after every step and the
server reads without blocking (for /aurora/stats, /metrics and /health)."""

from __future__ import annotations

import math

import numpy as np

from aurora_sgl.transport.segments import AttachedSegment, SharedSegment, create_segment


class TrainerStatus(SharedSegment):
    """A small shared-memory float64 array the trainer writes after every step and the server reads
    without blocking. Words: magic, seq (a seqlock: odd while the trainer writes), then FIELDS."""

    # Counters the trainer keeps. trained_positions counts a position once per optimizer step whose
    # loss includes it (fresh or replayed); recorded_positions counts the rows the engine recorded
    # and the trainer read: their ratio says whether the trainer keeps up with the traffic.
    # fresh_positions counts a position once, in the first step that trains on it: the share of
    # recorded positions that ever reach training (records lost on the way lower it).
    # context_positions counts rows a step ran over outside its loss (the context before a running
    # request's cut, TrainerConfig.cut_open_positions): a trainer device's budget spends them too.
    COUNTERS = (
        "train_steps",
        "publishes",
        "refused",
        "rollbacks_seen",
        "checkpoint_failures",
        "records_read",
        "ring_drops_seen",
        "last_published_version",
        "replay_steps",
        "step_failures",
        "trained_positions",
        "recorded_positions",
        "fresh_positions",
        "context_positions",
    )
    _FLOAT_FIELDS = ("heartbeat", "last_step_time", "loss", "sim_tau_candidate", "sim_tau_served")
    FIELDS = _FLOAT_FIELDS + COUNTERS
    _MAGIC = 0x5354415431  # "STAT1"
    _WORDS = 2 + len(FIELDS)

    def __init__(self, seg, spec: dict, owner: bool):
        self._seg, self._spec, self._owns_name = seg, spec, owner
        self._a = np.ndarray((self._WORDS,), np.float64, buffer=seg.buf)
        self._index = {name: 2 + i for i, name in enumerate(self.FIELDS)}

    @classmethod
    def create(cls, name_prefix: str) -> TrainerStatus:
        seg = create_segment(name_prefix, cls._WORDS * 8)  # mode 0600
        a = np.ndarray((cls._WORDS,), np.float64, buffer=seg.buf)
        a[0] = cls._MAGIC
        for i, name in enumerate(cls.FIELDS):  # "never computed" until the trainer says otherwise
            a[2 + i] = math.nan if name in cls._FLOAT_FIELDS[1:] else 0.0
        del a
        return cls(seg, {"name": seg.name, "fields": list(cls.FIELDS)}, owner=True)

    @classmethod
    def attach(cls, spec: dict) -> TrainerStatus:
        if list(spec.get("fields", [])) != list(cls.FIELDS):
            raise ValueError("status spec fields differ from this build's TrainerStatus.FIELDS")
        seg = AttachedSegment(spec["name"])
        a = np.ndarray((1,), np.float64, buffer=seg.buf)
        ok = len(seg.buf) >= cls._WORDS * 8 and a[0] == cls._MAGIC
        del a
        if not ok:
            seg.close()
            raise ValueError(f"segment {spec['name']} does not hold a trainer status")
        return cls(seg, dict(spec), owner=False)

    def write(self, **values: float) -> None:
        unknown = set(values) - set(self._index)
        if unknown:
            raise ValueError(f"unknown status fields: {sorted(unknown)}")
        a = self._a
        a[1] += 1  # odd: writing
        for name, value in values.items():
            a[self._index[name]] = float(value) if value is not None else math.nan
        a[1] += 1

    def snapshot(self, retries: int = 100) -> dict:
        """Field values (counters as int, never-computed floats as None). Never blocks: after
        `retries` torn reads it returns the last copy (fields are then at most one step apart)."""
        raw = None
        for _ in range(retries):
            seq = self._a[1]
            raw = self._a.copy()
            if seq == raw[1] and int(seq) % 2 == 0 and self._a[1] == seq:
                break
        out = {}
        for name, i in self._index.items():
            v = float(raw[i])
            if name in self._FLOAT_FIELDS:
                out[name] = None if math.isnan(v) else v
            else:
                out[name] = int(v) if math.isfinite(v) else 0
        return out

    def _drop_views(self) -> None:
        self._a = None
