"""When a new draft version serves worse than the last confirmed one: the rollback policy, shared
by both backends (the embedded engine's flywheel and the SGLang plugin). It only decides; the
caller owns the weights and carries out each `Decision` (copies, markers, the store's rollback flag).

A new version is judged once it has `window` drafting steps of live evidence: confirmed, unless its
accept length falls below the confirmed version's (over that version's last `baseline` steps) by
more than `margin`. The two figures must come from the same traffic: after a shift (code, then
math) every version looks worse than the one measured before it, and blaming the new weights would
throw away exactly the adaptation the shift calls for. So a suspect is not rolled back at once: the
confirmed weights serve one more `window` (a probe), measured afresh on requests that start after
it (the ones already running hold draft KV the suspect computed), and the suspect is rolled back
only if it is still worse than that; otherwise it comes back and is confirmed.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from aurora_sgl.engine.adaptive import chain_accept_length

log = logging.getLogger("aurora_sgl.rollback")

# What the caller does, in the order it must happen:
PROBE = "probe"  # keep the serving (suspect) weights aside, serve the confirmed ones
KEEP = "keep"  # the probe cleared the suspect: serve it again, then confirm it
CONFIRM = "confirm"  # the serving version becomes the confirmed one (copy it as the restore point)
ROLLBACK = "rollback"  # the confirmed weights (serving since the probe) stay; tell the trainer


@dataclass(frozen=True)
class Decision:
    action: str
    version: int  # the version the action is about: the suspect (PROBE, KEEP, ROLLBACK) or the one confirmed


class RollbackPolicy:
    def __init__(
        self, k: int, confirmed_version: int, *, window: int = 64, margin: float = 0.25, baseline: int | None = None
    ):
        self.k = k  # accept lengths are compared as a chain of k drafts would have had them
        self.confirmed_version = confirmed_version
        self.window = window
        self.margin = margin
        # The confirmed version's figure covers its last `baseline` drafting steps (default 8
        # windows): a baseline of one window is the tail of a few requests (at batch 8, eight steps
        # of the same eight), and a low tail once let a random head through the margin.
        baseline = max(window, baseline if baseline is not None else 8 * window)
        self._taus: dict[int, collections.deque] = collections.defaultdict(lambda: collections.deque(maxlen=baseline))
        self._probe: tuple[int, float] | None = None  # (suspect version, its live accept length)
        self._stale: set = set()  # requests running when the probe began: they hold the suspect's draft KV
        self.probes = 0
        self.rollbacks = 0

    @property
    def probing(self) -> bool:
        """While the confirmed version is re-measured no new version may be swapped in."""
        return self._probe is not None

    def observe(self, version: int, request_id, drafted: int, accepted: int) -> None:
        """One request's drafting step of `drafted` tokens by `version`, `accepted` of them taken.
        Steps that drafted nothing say nothing about the head."""
        if drafted and request_id not in self._stale:
            self._taus[version].append((drafted, accepted))

    def live_accept_length(self, version: int) -> float | None:
        """The accept length at K = k from drafting steps of any width (adaptive K): versions
        measured at different K mixes stay comparable."""
        taus = self._taus.get(version)
        return chain_accept_length(list(taus), self.k) if taus else None

    def measured(self) -> dict[str, float]:
        return {str(v): round(self.live_accept_length(v), 4) for v, t in self._taus.items() if t}

    def judge(self, serving: int, running: Callable[[], Iterable]) -> Decision | None:
        """What to do now that `serving` is the live version; `running()` lists the requests in
        flight (asked only when a probe starts)."""
        if self._probe is not None:
            return self._judge_probe()
        if serving == self.confirmed_version:
            return None
        taus = self._taus.get(serving)
        if taus is None or len(taus) < self.window:
            return None
        new = self.live_accept_length(serving)
        old = self.live_accept_length(self.confirmed_version)
        if old is not None and new < old - self.margin:
            log.info(
                "draft version %d looks worse (live tau %.3f < %.3f of version %d): re-measuring version %d",
                serving,
                new,
                old,
                self.confirmed_version,
                self.confirmed_version,
            )
            self.probes += 1
            self._probe = (serving, new)
            self._taus[self.confirmed_version].clear()
            self._stale = set(running())
            return Decision(PROBE, serving)
        log.info(
            "draft version %d confirmed (live tau %.3f over %d steps; version %d: %s)",
            serving,
            new,
            len(taus),
            self.confirmed_version,
            "unmeasured" if old is None else f"{old:.3f}",
        )
        self._confirm(serving)
        return Decision(CONFIRM, serving)

    def _judge_probe(self) -> Decision | None:
        suspect, new = self._probe
        taus = self._taus.get(self.confirmed_version)
        if taus is None or len(taus) < self.window:
            return None
        self._probe, self._stale = None, set()
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
            return Decision(ROLLBACK, suspect)
        log.info(
            "draft version %d kept: version %d measures %.3f on today's traffic", suspect, self.confirmed_version, old
        )
        self._confirm(suspect)
        return Decision(KEEP, suspect)

    def _confirm(self, version: int) -> None:
        self.confirmed_version = version
        for v in [v for v in self._taus if v != version]:
            del self._taus[v]
