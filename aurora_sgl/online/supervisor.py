"""Runs the trainer process for either backend: spawn it from a `TrainerSpec`, restart it when it
dies (from the newest checkpoint that loads), give up after `MAX_RESTARTS`, stop it on shutdown.

Serving never depends on the trainer: while it is down, and after the supervisor gives up, the
engine keeps the last good weights. What the supervisor knows (alive, restarts, what the last
restart resumed from, the last exit code) is reported through `state()` for /metrics and /health.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from aurora_sgl.trainer.checkpoints import newest_checkpoint
from aurora_sgl.trainer.spec import TrainerSpec
from aurora_sgl.transport.handoff import write_handoff

log = logging.getLogger("aurora_sgl.online")

MAX_RESTARTS = 5
POLL_S = 1.0


class TrainerSupervisor:
    def __init__(self, spec_path: str, *, max_restarts: int = MAX_RESTARTS):
        self.spec_path = spec_path  # where the spec is written for the trainer to read (0600)
        self.max_restarts = max_restarts
        self.spec: TrainerSpec | None = None
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self.restarted_from: str | None = None
        self.last_exit_code: int | None = None
        self.gave_up = False
        self._closing = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, spec: TrainerSpec) -> None:
        """Spawn the trainer and watch it from a daemon thread."""
        self.spec = spec
        self._spawn(spec)
        self._thread = threading.Thread(target=self._watch, name="aurora-trainer-supervisor", daemon=True)
        self._thread.start()

    def _spawn(self, spec: TrainerSpec) -> None:
        write_handoff(spec.to_dict(), self.spec_path)  # CUDA IPC handles go to a pickle file beside it
        env = dict(os.environ, OMP_NUM_THREADS=str(spec.threads))
        self.proc = subprocess.Popen([sys.executable, "-m", "aurora_sgl.trainer", "--spec", self.spec_path], env=env)
        log.info("trainer started (pid %d) on %s", self.proc.pid, spec.device)

    def _watch(self) -> None:
        while not self._closing.wait(POLL_S):
            if self.proc is None or self.proc.poll() is None:
                continue
            self.last_exit_code = self.proc.returncode
            if self.restarts >= self.max_restarts:
                self.gave_up = True
                log.error("trainer exited %d times; serving the last good weights without training", self.restarts)
                return
            self.restarts += 1
            resume = newest_checkpoint(self.spec.checkpoint_dir)
            self.restarted_from = resume or self.spec.init_head or "the served weights"
            log.warning(
                "trainer exited with %s; restart %d from %s", self.last_exit_code, self.restarts, self.restarted_from
            )
            self._spawn(self.spec.restarted_from(resume))

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def state(self) -> dict:
        return {
            "alive": self.alive,
            "restarts": self.restarts,
            "restarted_from": self.restarted_from,
            "last_exit_code": self.last_exit_code,
            "gave_up": self.gave_up,
        }

    def terminate(self) -> None:
        """Signal-safe: ask the trainer to stop without waiting (SIGTERM handlers call this)."""
        self._closing.set()
        if self.alive:
            self.proc.terminate()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the trainer: SIGTERM (it finishes its step), then SIGKILL after `timeout`."""
        self._closing.set()
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=POLL_S * 2)


def wait_for_heartbeat(status, timeout: float = 60.0) -> bool:
    """True once the trainer has written its first heartbeat into `status` (a TrainerStatus)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if status.snapshot().get("heartbeat", 0) > 0:
            return True
        time.sleep(0.05)
    return False
