"""What a launcher hands the trainer process: where the segments are, what to start from, how to
train. Built by both launchers (the embedded server's `online.sidecar`, the SGLang backend's
launcher), validated here, written as JSON by `transport.handoff`, read back by the trainer."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from aurora_sgl.trainer.config import TrainerConfig


@dataclass(frozen=True)
class TrainerSpec:
    ring: dict  # SignalRing.spec()  -- step records from the engine (read side)
    store: dict  # WeightStore.spec() -- where head versions are published (version 1: the launcher)
    model_path: str  # target model dir: only its input embedding and lm_head weight are kept
    status: dict | None = None  # TrainerStatus.spec() -- heartbeat and counters for the server
    # Where more rings' specs appear (`ring_dp<d>.json`, one per SGLang data-parallel replica past
    # the first, possibly after the trainer started; `transport.ring_set`). None: `ring` only.
    ring_dir: str | None = None
    init_head: str | None = None  # EAGLE-3 checkpoint dir to start from; None: the store's active version
    # With init_head: take only its shapes from there and its weights from the store's active
    # version (a restart with no checkpoint yet continues from what is served, not from day 0).
    weights_from_store: bool = False
    pretrained: bool | None = None  # selects the lr default; None: whether init_head is given
    aux_layer_ids: list[int] | None = None  # needed when init_head is None
    draft_vocab_size: int | None = None
    config: dict = field(default_factory=dict)  # TrainerConfig fields
    checkpoint_dir: str | None = None
    threads: int = 1
    device: str = "cpu"
    parent_pid: int | None = None  # the trainer exits when its parent goes away

    def __post_init__(self):
        for name in ("ring", "store"):
            if not isinstance(getattr(self, name), dict) or not getattr(self, name):
                raise ValueError(f"trainer spec needs '{name}' (a segment spec)")
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError("trainer spec needs 'model_path'")
        if self.init_head is None and not self.aux_layer_ids:
            raise ValueError("trainer spec needs 'aux_layer_ids' when init_head is null")
        if not isinstance(self.threads, int) or isinstance(self.threads, bool) or self.threads < 1:
            raise ValueError(f"threads must be a positive integer, got {self.threads!r}")
        if not isinstance(self.device, str) or not self.device:
            raise ValueError(f"device must be a torch device string, got {self.device!r}")
        object.__setattr__(self, "config", dict(self.config or {}))
        TrainerConfig.from_dict(self.config)  # refuses a bad setting before any process starts

    @property
    def trainer_config(self) -> TrainerConfig:
        return TrainerConfig.from_dict(self.config)

    @property
    def starts_pretrained(self) -> bool:
        return self.init_head is not None if self.pretrained is None else bool(self.pretrained)

    def restarted_from(self, checkpoint: str | None) -> TrainerSpec:
        """The spec for a restart: from `checkpoint` (the newest one that loads) when there is one,
        else from the weights being served; either way the lr of a pretrained head."""
        return dataclasses.replace(
            self, init_head=checkpoint or self.init_head, weights_from_store=checkpoint is None, pretrained=True
        )

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, d: dict) -> TrainerSpec:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown trainer spec keys: {', '.join(unknown)}")
        missing = [k for k in ("ring", "store", "model_path") if not d.get(k)]
        if missing:
            raise ValueError(f"trainer spec needs '{missing[0]}'")
        return cls(**{k: v for k, v in d.items() if v is not None or k in ("init_head",)})

    @classmethod
    def coerce(cls, spec: TrainerSpec | dict) -> TrainerSpec:
        return spec if isinstance(spec, cls) else cls.from_dict(spec)
