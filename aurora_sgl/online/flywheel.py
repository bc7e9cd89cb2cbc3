"""Engine side of the serve-to-train loop: step records out to the signal ring, new draft weights in
from the weight store, and the live guardrail that rolls a bad version back.

Everything here runs on the engine thread between two steps (`Engine.before_step`) or right after
one (`Engine.record_sink`), never waits on the trainer, and never replaces a parameter object: new
weights are copied into the existing storage (CUDA graphs captured those pointers).

Whatever the trainer publishes -- late, NaN, random -- outputs stay exact, because verification
decides every token. What a bad version can cost is speed, which the rollback bounds: the policy
(`online/rollback.py`, shared with the SGLang plugin) judges each new version on live acceptance
against the last confirmed one, re-measured on the same traffic; this module carries its decisions
out on the engine's parameters.
"""

from __future__ import annotations

import collections
import logging
import time

import torch

from aurora_sgl.engine.engine import Engine, StepRecord
from aurora_sgl.online.rollback import KEEP, PROBE, ROLLBACK, RollbackPolicy
from aurora_sgl.online.version_check import SUPERSEDED, refusal_reason
from aurora_sgl.transport.signal_ring import SignalRing
from aurora_sgl.transport.weight_store import WeightStore

log = logging.getLogger("aurora_sgl.flywheel")

SWAP_RETRIES = 3


class Flywheel:
    def __init__(
        self,
        engine: Engine,
        ring: SignalRing | None,
        store: WeightStore,
        *,
        window: int = 64,
        margin: float = 0.25,
        baseline: int | None = None,
    ):
        self.engine = engine
        self.ring = ring
        self.store = store
        state = engine.head.serving_state()
        if list(state) != list(store.names):
            raise ValueError("the weight store's layout does not match the draft head")
        self.params = list(state.values())  # state_dict tensors share the parameters' storage
        # The last confirmed version, restored on rollback; written outside the swap pause.
        self.confirmed = [p.detach().clone() for p in self.params]
        self._suspect = [p.detach().clone() for p in self.params]  # a suspect version's weights during a probe
        self.policy = RollbackPolicy(engine.k, engine.draft_version, window=window, margin=margin, baseline=baseline)
        self.swaps = 0
        self.refused = 0
        self.last_refused_version = 0
        self.failed_copies = 0
        self.recorded_positions = 0  # rows handed to the trainer (its budget counts per recorded position)
        self.last_swap_pause_s = 0.0
        self.swap_pauses: collections.deque = collections.deque(maxlen=4096)
        self._skip_through = engine.draft_version  # refused versions are not polled again
        engine.before_step = self.before_step
        engine.record_sink = self.record_sink

    # ---- records out ------------------------------------------------------------------------
    def record_sink(self, records: list[StepRecord]) -> None:
        if self.ring is not None:
            self.ring.write_many(records)
        self.recorded_positions += sum(r.input_tokens.numel() for r in records)
        for r in records:
            drafted = self.engine.k if r.num_drafted is None else r.num_drafted
            # A fallback head's drafts say nothing about the live version (engine/head_choice.py).
            if not r.prefill and r.draft_head == 0:
                self.policy.observe(r.draft_version, r.request_id, drafted, r.num_accepted)

    def live_accept_length(self, version: int) -> float | None:
        return self.policy.live_accept_length(version)

    @property
    def confirmed_version(self) -> int:
        return self.policy.confirmed_version

    @property
    def rollbacks(self) -> int:
        return self.policy.rollbacks

    @property
    def probes(self) -> int:
        return self.policy.probes

    # ---- weights in -------------------------------------------------------------------------
    def before_step(self, engine: Engine) -> None:
        self._judge_current()
        if self.policy.probing:  # no new version while the confirmed one is re-measured
            return
        polled = self.store.poll(max(engine.draft_version, self._skip_through))
        if polled is not None:
            self._swap(*polled)

    @torch.no_grad()
    def _swap(self, version: int, views: list[torch.Tensor]) -> None:
        t0 = time.perf_counter()
        reason = refusal_reason(self.store, version, views)
        if reason == SUPERSEDED:  # take the newer one next step
            return
        if reason is not None:
            self.refused += 1
            self.last_refused_version = version
            self._skip_through = version
            self.store.request_rollback(version)
            log.warning("refused draft version %d (%s)", version, reason)
            return
        for _ in range(SWAP_RETRIES):
            if self.store.copy_into(self.params, version):
                break
            # The trainer rewrote the source buffer mid-copy (two publishes during one copy): the
            # params are mixed, so take whatever is active now.
            self.failed_copies += 1
            polled = self.store.poll(version - 1)
            if polled is None:
                break
            version = polled[0]
        else:
            self._restore_confirmed()
            return
        self.engine.draft_version = version
        self.swaps += 1
        self.last_swap_pause_s = time.perf_counter() - t0
        self.swap_pauses.append(self.last_swap_pause_s)

    @torch.no_grad()
    def _judge_current(self) -> None:
        """Carry out the policy's verdict on the serving version."""
        d = self.policy.judge(self.engine.draft_version, lambda: [r.id for r in self.engine.running])
        if d is None:
            return
        if d.action == PROBE:
            torch._foreach_copy_(self._suspect, self.params)
            self._restore_confirmed()
        elif d.action == ROLLBACK:  # the confirmed weights serve since the probe
            self._skip_through = max(self._skip_through, d.version)
            self.store.request_rollback(d.version)
        else:
            if d.action == KEEP:
                torch._foreach_copy_(self.params, self._suspect)
                self.engine.draft_version = d.version
            torch._foreach_copy_(self.confirmed, self.params)

    @torch.no_grad()
    def _restore_confirmed(self) -> None:
        torch._foreach_copy_(self.params, self.confirmed)
        self.engine.draft_version = self.confirmed_version

    def stats(self) -> dict:
        ring = self.ring.stats() if self.ring is not None else {}
        return {
            "draft_version": self.engine.draft_version,
            "confirmed_version": self.confirmed_version,
            "swaps": self.swaps,
            "rollbacks": self.rollbacks,
            "probes": self.probes,
            "refused": self.refused,
            "last_refused_version": self.last_refused_version,
            "failed_copies": self.failed_copies,
            "last_swap_pause_s": self.last_swap_pause_s,
            "ring_written": ring.get("written", 0),
            "recorded_positions": self.recorded_positions,
            "ring_drops": ring.get("drops", 0),
            "live_accept_length": self.policy.measured(),
        }
