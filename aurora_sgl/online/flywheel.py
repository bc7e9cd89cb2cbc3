"""Engine side of the serve-to-train loop: step records out to the signal ring, new draft weights in
from the weight store, and the live guardrail that rolls a bad version back.

Everything here runs on the engine thread between two steps (`Engine.before_step`) or right after
one (`Engine.record_sink`), never waits on the trainer, and never replaces a parameter object: new
weights are copied into the existing storage (CUDA graphs captured those pointers).

Whatever the trainer publishes -- late, NaN, random -- outputs stay exact, because verification
decides every token. What a bad version can cost is speed, which the rollback bounds: when a new
version's live accept length over its first `window` drafting steps falls below the last confirmed
version's (over its last `baseline` steps) by more than `margin`, the confirmed weights come back
and the trainer is told.

The two figures must come from the same traffic: after a shift (code, then math) every version
looks worse than the one measured before it, and blaming the new weights would throw away exactly
the adaptation the shift calls for. So a suspect version is not rolled back at once: the confirmed
weights serve one more `window` (a probe), measured afresh on requests that start after it (the
ones already running hold draft KV the suspect computed), and the suspect is rolled back only if
it is still worse than that; otherwise it comes back and is confirmed.
"""

from __future__ import annotations

import collections
import logging
import time

import torch

from aurora_sgl.engine.adaptive import chain_accept_length
from aurora_sgl.engine.engine import Engine, StepRecord
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
        self._probe: tuple[int, float] | None = None  # (suspect version, its live accept length)
        # Requests running when a probe starts hold draft KV computed by the suspect's weights:
        # they would measure a mix, so the probe counts only requests that start after it.
        self._probe_stale: set[str] = set()
        self.confirmed_version = engine.draft_version
        self.window = window
        self.margin = margin
        # A new version is judged after `window` drafting steps, against the confirmed version's
        # last `baseline` (default 8 windows): a baseline of one window is the tail of a few
        # requests (at batch 8, eight steps of the same eight), and a low tail once let a random
        # head through the margin.
        baseline = max(window, baseline if baseline is not None else 8 * window)
        self._taus: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=baseline))
        self.swaps = 0
        self.rollbacks = 0
        self.probes = 0
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
            if drafted and not r.prefill and r.draft_head == 0 and r.request_id not in self._probe_stale:
                self._taus[r.draft_version].append((drafted, r.num_accepted))

    def live_accept_length(self, version: int) -> float | None:
        """The accept length at the engine's K, from drafting steps of any width (adaptive K):
        versions measured at different K mixes stay comparable."""
        taus = self._taus.get(version)
        return chain_accept_length(list(taus), self.engine.k) if taus else None

    # ---- weights in -------------------------------------------------------------------------
    def before_step(self, engine: Engine) -> None:
        self._judge_current()
        if self._probe is not None:  # no new version while the confirmed one is re-measured
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

    def _judge_current(self) -> None:
        """Confirm or roll back the serving version once it has `window` verify steps of evidence."""
        if self._probe is not None:
            self._judge_probe()
            return
        current = self.engine.draft_version
        if current == self.confirmed_version:
            return
        taus = self._taus.get(current)
        if taus is None or len(taus) < self.window:
            return
        new = self.live_accept_length(current)
        old = self.live_accept_length(self.confirmed_version)
        if old is not None and new < old - self.margin:
            # `old` was measured on earlier traffic: re-measure the confirmed weights now.
            log.info(
                "draft version %d looks worse (live tau %.3f < %.3f of version %d): re-measuring version %d",
                current,
                new,
                old,
                self.confirmed_version,
                self.confirmed_version,
            )
            self.probes += 1
            torch._foreach_copy_(self._suspect, self.params)
            self._probe = (current, new)
            self._taus[self.confirmed_version].clear()
            self._probe_stale = {r.id for r in self.engine.running}
            self._restore_confirmed()
            return
        log.info(
            "draft version %d confirmed (live tau %.3f over %d steps; version %d: %s)",
            current,
            new,
            len(taus),
            self.confirmed_version,
            "unmeasured" if old is None else f"{old:.3f}",
        )
        self._confirm_current()

    def _judge_probe(self) -> None:
        suspect, new = self._probe
        taus = self._taus.get(self.confirmed_version)
        if taus is None or len(taus) < self.window:
            return
        self._probe, self._probe_stale = None, set()
        old = self.live_accept_length(self.confirmed_version)
        if new < old - self.margin:
            log.warning(
                "rolling back draft version %d (live tau %.3f < %.3f of version %d on the same traffic)",
                suspect,
                new,
                old,
                self.confirmed_version,
            )
            self.rollbacks += 1
            self._skip_through = max(self._skip_through, suspect)
            self.store.request_rollback(suspect)
            return
        log.info(
            "draft version %d kept: version %d measures %.3f on today's traffic", suspect, self.confirmed_version, old
        )
        torch._foreach_copy_(self.params, self._suspect)
        self.engine.draft_version = suspect
        self._confirm_current()

    def _confirm_current(self) -> None:
        current = self.engine.draft_version
        torch._foreach_copy_(self.confirmed, self.params)
        self.confirmed_version = current
        for v in [v for v in self._taus if v not in (current, self.confirmed_version)]:
            del self._taus[v]

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
            "live_accept_length": {
                str(v): round(self.live_accept_length(int(v)), 4) for v, t in self._taus.items() if t
            },
        }
