"""Online training for a running engine: owns the shared-memory segments, starts and supervises the
trainer sidecar, and attaches the flywheel to the engine.

The server process creates everything (ring, weight store, trainer status) and removes it on exit;
the trainer process only attaches. If the trainer dies the engine keeps serving the last good
weights, and the supervisor restarts the trainer from the newest checkpoint.
"""

from __future__ import annotations

import logging
import os
import tempfile

from aurora_sgl.engine.engine import Engine
from aurora_sgl.online.flywheel import Flywheel
from aurora_sgl.online.supervisor import TrainerSupervisor, wait_for_heartbeat
from aurora_sgl.trainer.config import TrainerConfig
from aurora_sgl.trainer.spec import TrainerSpec
from aurora_sgl.transport.segments import cleanup_on_signals
from aurora_sgl.transport.signal_ring import SignalRing, ring_capacity
from aurora_sgl.transport.trainer_status import TrainerStatus
from aurora_sgl.transport.weight_store import WeightStore, layout_of

log = logging.getLogger("aurora_sgl.online")


class OnlineTraining:
    def __init__(
        self,
        engine: Engine,
        *,
        model_path: str,
        objective: str = "kl",
        trainer_device: str = "cpu",
        checkpoint_dir: str | None = None,
        trainer_threads: int = 1,
        init_head: str | None = None,
        fallback_to_start: bool = True,
        trainer_config: dict | None = None,
        ring_records: int | None = None,
    ):
        if engine.k < 1:
            raise ValueError("online training needs speculation on (--speculative-num-steps >= 1)")
        # Validates the trainer's settings before any segment exists.
        config = dict(trainer_config or {}, objective=objective)
        kept = TrainerConfig.from_dict(config).prompt_tokens
        self.engine = engine
        engine.record_prompt_tokens = None if kept < 0 else kept
        h = engine.target.config.hidden_size
        aux_dim = len(engine.target.aux_layer_ids) * h
        ring_records = ring_records or ring_capacity(engine.k + 1, aux_dim, h, engine.k)
        self.ring = SignalRing.create("aurora_ring", ring_records, engine.k + 1, aux_dim, h, engine.k)
        self.store = WeightStore.create("aurora_weights", layout_of(engine.head.serving_state()))
        self.status = TrainerStatus.create("aurora_trainer")
        # A pretrained start head stays as the engine's fallback (engine/head_choice.py): what it
        # drafts well, the live head may forget. A random start has nothing to fall back to.
        if fallback_to_start and init_head is not None:
            engine.add_fallback_head()
        # Version 1 is what the engine serves now; the trainer starts from it.
        engine.draft_version = self.store.publish(engine.head.serving_state())
        self.flywheel = Flywheel(engine, self.ring, self.store)
        self.checkpoint_dir = checkpoint_dir
        # 0700, named after this process so a later server can sweep it if this one is SIGKILLed.
        self._spec_dir = tempfile.mkdtemp(prefix=f"aurora_trainer_{os.getpid()}_")
        self.spec = TrainerSpec(
            ring=self.ring.spec(),
            store=self.store.spec(),
            status=self.status.spec(),
            model_path=model_path,
            init_head=init_head,
            pretrained=init_head is not None,
            aux_layer_ids=list(engine.target.aux_layer_ids),
            draft_vocab_size=engine.head.config.draft_vocab_size,
            config=config,
            checkpoint_dir=checkpoint_dir,
            threads=trainer_threads,
            device=trainer_device,
            parent_pid=os.getpid(),
        )
        self.supervisor = TrainerSupervisor(os.path.join(self._spec_dir, "spec.json"))

    def start(self) -> None:
        self.supervisor.start(self.spec)
        # uvicorn re-raises SIGTERM / SIGINT after its graceful shutdown, so code after serve()
        # never runs on a signal: remove the segments (and stop the trainer) from the handler.
        cleanup_on_signals(self)

    def unlink(self) -> None:
        """Signal-safe part of close(): stop the trainer without waiting, remove the segments and
        the trainer's spec file (on SIGTERM close() never runs: this is the only cleanup)."""
        self.supervisor.terminate()
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

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def trainer_pid(self) -> int | None:
        return self.supervisor.pid

    def trainer_state(self) -> dict:
        snap = self.status.snapshot()
        snap.update(self.supervisor.state())
        return snap

    def close(self, timeout: float = 10.0) -> None:
        """Stop the trainer (SIGTERM, then SIGKILL) and remove every shared-memory segment."""
        self.supervisor.stop(timeout)
        self.engine.before_step = None
        self.engine.record_sink = None
        for seg in (self.ring, self.store, self.status):
            seg.close()
        self._remove_spec()

    def wait_for_trainer(self, timeout: float = 60.0) -> bool:
        """True once the trainer has written its first heartbeat (for tests and the launcher)."""
        return wait_for_heartbeat(self.status, timeout)
