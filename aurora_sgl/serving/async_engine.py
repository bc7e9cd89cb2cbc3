"""Runs the engine's step loop on its own thread and hands results to asyncio consumers.

The HTTP layer never touches the engine's running batch: it submits requests (the engine's intake
is locked) and asks for aborts, which the loop applies between two steps. After every step the loop
pushes each in-flight request's new tokens to that request's asyncio queue.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

from aurora_sgl.engine.engine import Engine, Request
from aurora_sgl.engine.sampling import SamplingParams

log = logging.getLogger("aurora_sgl.engine_loop")


@dataclass
class Update:
    token_ids: list[int]  # all output ids so far
    finished: bool
    request: Request


@dataclass
class _Stream:
    request: Request
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    sent: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None


class AsyncEngine:
    def __init__(self, engine: Engine, on_finish=None, on_step=None):
        self.engine = engine
        self._streams: dict[str, _Stream] = {}
        self._aborts: list[Request] = []
        self._wake = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="aurora-engine", daemon=True)
        self.on_finish = on_finish  # callback(stream) on the loop thread, for metrics
        self.on_step = on_step  # callback(records, step_seconds)
        self.healthy = True
        self.last_error: str | None = None
        self.peak_in_flight = 0  # high-water mark since start: what admission control must bound

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        """Finish what is running (drain), then stop the loop."""
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=5)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_running(self) -> int:
        return len(self.engine.running)

    @property
    def num_waiting(self) -> int:
        return len(self.engine.waiting)

    def submit(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> tuple[Request, asyncio.Queue]:
        """Called from the event loop. Raises ValueError (e.g. prompt too long, or `request_id`
        already in flight) before queueing."""
        loop = asyncio.get_running_loop()
        if request_id is not None and request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in flight")
        req = self.engine.add_request(prompt, params, request_id)
        queue: asyncio.Queue = asyncio.Queue()
        with self._wake:
            self._streams[req.id] = _Stream(req, queue, loop)
            self.peak_in_flight = max(self.peak_in_flight, len(self._streams))
            self._wake.notify_all()
        return req, queue

    def abort(self, req: Request) -> None:
        with self._wake:
            self._aborts.append(req)
            self._wake.notify_all()

    def _run(self) -> None:
        eng = self.engine
        while True:
            with self._wake:
                while not self._stop and not eng.has_work and not self._aborts:
                    self._wake.wait(timeout=0.5)
                if self._stop:
                    break
                aborts, self._aborts = self._aborts, []
            for req in aborts:
                eng.abort(req)
            try:
                t0 = time.perf_counter()
                records = eng.step() if eng.has_work else []
                if self.on_step is not None:
                    self.on_step(records, time.perf_counter() - t0)
            except Exception as e:  # never leave clients hanging: fail what is in flight
                log.exception("engine step failed")
                self.last_error = repr(e)
                for r in list(eng.running) + list(eng.waiting):
                    eng.abort(r)
                    r.finish_reason = "error"
                eng.retire_finished()
            self._publish()
        for s in list(self._streams.values()):  # loop stopped: release anyone still waiting
            s.request.finish_reason = s.request.finish_reason or "abort"
            self._push(s, finished=True)

    def _publish(self) -> None:
        now = time.perf_counter()
        for rid, s in list(self._streams.items()):
            r = s.request
            n = len(r.output_ids)
            if n > s.sent or r.finished:
                if s.first_token_at is None and n:
                    s.first_token_at = now
                s.sent = n
                self._push(s, finished=r.finished)
            if r.finished:
                with self._wake:
                    self._streams.pop(rid, None)
                if self.on_finish is not None:
                    self.on_finish(s, now)

    @staticmethod
    def _push(s: _Stream, finished: bool) -> None:
        update = Update(list(s.request.output_ids), finished, s.request)
        try:
            s.loop.call_soon_threadsafe(s.queue.put_nowait, update)
        except RuntimeError:  # the event loop is gone (server shutting down)
            pass
