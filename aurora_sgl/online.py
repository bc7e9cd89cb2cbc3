"""Online training for a running engine: owns the shared-memory segments, starts and supervises the
trainer sidecar, and attaches the flywheel to the engine.

The server process creates everything (ring, weight store, trainer status) and removes it on exit;
the trainer process only attaches. If the trainer dies the engine keeps serving the last good
weights, and the supervisor restarts the trainer from the newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import threading
import time

from .engine import Engine
from .flywheel import Flywheel
from .signal_ring import SignalRing, cleanup_on_signals
from .spec_io import write_spec
from .trainer import TrainerConfig, TrainerStatus, newest_checkpoint
from .weight_store import WeightStore, layout_of

log = logging.getLogger("aurora_sgl.online")

RING_RECORDS = 4096
MAX_RESTARTS = 5


class OnlineTraining:
    def __init__(self, engine: Engine, *, model_path: str, objective: str = "kl", trainer_device: str = "cpu",
                 checkpoint_dir: str | None = None, trainer_threads: int = 1, init_head: str | None = None,
                 trainer_config: dict | None = None, ring_records: int = RING_RECORDS):
        if engine.k < 1:
            raise ValueError("online training needs speculation on (--speculative-num-steps >= 1)")
        # Validates the trainer's settings before any segment exists.
        kept = TrainerConfig.from_dict(dict(trainer_config or {}, objective=objective)).prompt_tokens
        self.engine = engine
        engine.record_prompt_tokens = None if kept < 0 else kept
        h = engine.target.config.hidden_size
        aux_dim = len(engine.target.aux_layer_ids) * h
        self.ring = SignalRing.create("aurora_ring", ring_records, engine.k + 1, aux_dim, h, engine.k)
        self.store = WeightStore.create("aurora_weights", layout_of(engine.head.serving_state()))
        self.status = TrainerStatus.create("aurora_trainer")
        # Version 1 is what the engine serves now; the trainer starts from it.
        engine.draft_version = self.store.publish(engine.head.serving_state())
        self.flywheel = Flywheel(engine, self.ring, self.store)
        self.checkpoint_dir = checkpoint_dir
        self._spec_dir = tempfile.mkdtemp(prefix="aurora_trainer_")  # 0700
        self.spec = {
            "ring": self.ring.spec(), "store": self.store.spec(), "status": self.status.spec(),
            "model_path": model_path, "init_head": init_head, "pretrained": init_head is not None,
            "aux_layer_ids": list(engine.target.aux_layer_ids),
            "draft_vocab_size": engine.head.config.draft_vocab_size,
            "config": dict(trainer_config or {}, objective=objective), "checkpoint_dir": checkpoint_dir,
            "threads": trainer_threads, "device": trainer_device, "parent_pid": os.getpid(),
        }
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._closing = threading.Event()
        self._supervisor = threading.Thread(target=self._supervise, name="aurora-trainer-supervisor", daemon=True)

    def start(self) -> None:
        self._spawn(self.spec)
        self._supervisor.start()
        # uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, so code after serve()
        # never runs on a signal: remove the segments (and stop the trainer) from the handler.
        cleanup_on_signals(self)

    def unlink(self) -> None:
        """Signal-safe part of close(): stop the trainer without waiting, remove the segments and
        the trainer's spec file (on SIGTERM close() never runs: this is the only cleanup)."""
        self._closing.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        for seg in (self.ring, self.store, self.status):
            seg.unlink()
        self._remove_spec()

    def _remove_spec(self) -> None:
        """The spec and, on CUDA, the IPC-handle pickle beside it; then the directory."""
        try:
            for name in os.listdir(self._spec_dir):
                os.remove(os.path.join(self._spec_dir, name))
            os.rmdir(self._spec_dir)
        except OSError:
            pass

    def _spawn(self, spec: dict) -> None:
        path = os.path.join(self._spec_dir, "spec.json")
        write_spec(spec, path)  # 0600; CUDA IPC handles go to a pickle file beside it
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]))
        self.proc = subprocess.Popen([sys.executable, "-m", "aurora_sgl.trainer", "--spec", path], env=env)
        log.info("trainer started (pid %d)", self.proc.pid)

    def _supervise(self) -> None:
        while not self._closing.wait(1.0):
            if self.proc is None or self.proc.poll() is None:
                continue
            if self.restarts >= MAX_RESTARTS:
                log.error("trainer exited %d times; serving the last good weights without training", self.restarts)
                return
            self.restarts += 1
            resume = newest_checkpoint(self.checkpoint_dir)
            log.warning("trainer exited with %s; restart %d from %s", self.proc.returncode, self.restarts,
                        resume or "the served weights")
            self._spawn(dict(self.spec, init_head=resume, pretrained=True))

    @property
    def trainer_pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def trainer_state(self) -> dict:
        snap = self.status.snapshot()
        snap.update(alive=self.proc is not None and self.proc.poll() is None, restarts=self.restarts)
        return snap

    def close(self, timeout: float = 10.0) -> None:
        """Stop the trainer (SIGTERM, then SIGKILL) and remove every shared-memory segment."""
        self._closing.set()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.engine.before_step = None
        self.engine.record_sink = None
        for seg in (self.ring, self.store, self.status):
            seg.close()
        self._remove_spec()

    def wait_for_trainer(self, timeout: float = 60.0) -> bool:
        """True once the trainer has written its first heartbeat (for tests and the launcher)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.status.snapshot().get("heartbeat", 0) > 0:
                return True
            time.sleep(0.05)
        return False
