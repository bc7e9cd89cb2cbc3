"""The trainer's settings: one dataclass that validates itself, so a bad value is refused by the
launcher before any process or segment exists."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any

from aurora_sgl.training.losses import OBJECTIVES

INJECT_KINDS = ("nan", "random", "corrupt")
_INJECT = re.compile(r"\s*(nan|random|corrupt)\s*@\s*(\d+)\s*\Z")
MIN_SEQUENCE_TOKENS = 3
GUARDRAIL_DATA = ("fresh", "held_out")
# Higher than Aurora's 1e-4 / 1e-5 on GPUs because a trainer here takes far fewer steps per request.
# A pretrained start learns at the same rate as a random one: 3e-4 (the default until 2026-12-02)
# gained less after a shift on every tuning stream under a trainer budget (benchmarks/README.md,
# traffic shift, "lr for a pretrained start"). Two names: Aurora's GPU setting differs.
LR_FROM_RANDOM = 1e-3
LR_FROM_PRETRAINED = 1e-3


@dataclass
class TrainerConfig:
    objective: str = "kl"  # "kl" | "kl_rejected" | "accept" (see losses.draft_loss)
    # None: LR_FROM_RANDOM or LR_FROM_PRETRAINED (below).
    lr: float | None = None
    clip: float = 2.5  # gradient-norm clip
    weight_decay: float = 0.0  # AdamW
    # AdamW's second-moment decay: its memory (~1 / (1 - beta2) steps) is how long the step sizes
    # keep the scale of the gradients before a shift.
    adam_beta2: float = 0.999
    unroll: int = 5  # TTT unroll steps (weights 0.8**k live in draft_loss); also the guardrail's K
    # Positions per optimizer step. Small steps learn more per trained position under a fixed
    # trainer budget (benchmarks/README.md, traffic shift under a trainer budget).
    tokens_per_step: int = 64
    # When the ring is empty (the trainer has caught up with the traffic), up to this many extra
    # steps per fresh step on a sample of the most recent `replay_sequences` training sequences:
    # idle compute spent on the traffic of the last minutes instead of sleeping (the figures behind
    # the default: benchmarks/README.md, traffic shift).
    replay_per_step: float = 3.0
    # A modelled trainer device (benchmarks): > 0 trains exactly this many positions per recorded
    # position -- it reads everything recorded, trains only while below the budget and then replays
    # recent sequences without the per-step limit. 0: free-running (as fast as it can, up to the
    # replay limit). A driver in lockstep with it measures what a trainer of that capacity learns,
    # however fast this machine serves.
    position_budget: float = 0.0
    replay_sequences: int = 64
    # Replay draws a recent sequence with weight 2^(-age / replay_half_life), age in sequences
    # (trainer/replay.py): each is replayed about as often as before, but soon after it arrives,
    # so after a shift replay trains on the new domain instead of the buffer's older traffic.
    # 0: uniform over the buffer. Measured under a trainer budget, half-lives 8 and 16 gained
    # nothing on the tuning streams (benchmarks/README.md, traffic shift), so it stays off.
    replay_half_life: float = 0.0
    # A uniform sample (reservoir) of every sequence trained on so far, this many; replay steps then
    # draw from it half the time, so a domain the traffic left is rehearsed and not forgotten
    # by the time it comes back. 0: replay the recent sequences only.
    replay_reservoir: int = 0
    # > 0: publish (and judge, and checkpoint) an exponential moving average of the training
    # weights with this half-life in optimizer steps instead of the training weights themselves
    # (training/averaging.py). Chosen among 8 / 16 / 32 on the tuning streams under a trainer
    # budget, checked on the check streams (benchmarks/README.md, traffic shift, "Serving the
    # average"). 0: the training weights (the behaviour until 2026-12-08).
    average_half_life: float = 8.0
    max_sequence_tokens: int = 512  # a request's stitched segment is cut at this length
    # > 0: with nothing new closed to learn from, learn from requests still running -- their rows so
    # far, once this many positions have not been trained on (Stitcher.cut_open) -- before replaying
    # old ones. Right after a shift every request of the new domain is still running. 0: only
    # finished requests' sequences (the behaviour until 2026-12-08).
    cut_open_positions: int = 0
    # Prompt positions kept per request: the last ones before the first generated token. The head
    # drafts generated tokens, and on a long prompt the prompt is most of a step's compute; keeping
    # the last few lets the trainer keep up with the traffic (benchmarks/README.md, traffic shift).
    # 0 keeps none; -1 keeps every prompt position.
    prompt_tokens: int = 32
    publish_every: int = 16  # optimizer steps between publish attempts (1024 positions at the default step)
    rejected_weight: float = 2.0  # kl_rejected: a position whose draft was rejected weighs 1 + this
    margin: float = 0.05  # publish if sim_tau(candidate) >= sim_tau(served) - margin
    # What the guardrail judges on. "fresh": every new sequence, just before the trainer learns from
    # it, is scored by the training head and by the served head; a candidate is compared over the
    # newest `holdout_capacity` of them, so the judgement follows the traffic and nothing is kept
    # out of training. "held_out": a `holdout_fraction` of sequences never trained on, the newest
    # `holdout_capacity` kept -- it lags a shift by capacity / fraction requests and refused heads
    # learning the new domain (benchmarks/README.md, traffic shift under a trainer budget).
    guardrail_on: str = "fresh"
    holdout_fraction: float = 0.1  # "held_out": share of sequences kept out of training
    holdout_capacity: int = 16  # sequences the guardrail judges on (the newest)
    checkpoint_every: int = 5  # publishes between checkpoints
    keep_checkpoints: int = 3
    vocab_refresh_every: int = 10  # publishes between draft-vocabulary refreshes
    vocab_change_threshold: float = 0.05  # remap only when more than this share of hot ids changes
    vocab_count_decay: float = 0.5  # token counts are multiplied by this at each refresh (recency)
    read_batch: int = 256  # ring records per read
    idle_sleep_s: float = 0.005  # sleep when the ring is empty
    segment_idle_s: float = 1.0  # ring empty this long: close every open segment (requests done)
    heartbeat_s: float = 0.25  # status heartbeat while idle
    seed: int = 0
    # CPU niceness the trainer process takes (0-19; a process of its own only). Where the trainer
    # shares a machine's cores with serving, as in a CPU demo, serving's threads then come first.
    nice: int = 0
    inject: list[str] = field(default_factory=list)  # faults (trainer/faults.py): ["nan@2", "corrupt@4"]
    inject_bypass_guardrail: bool = False  # injected faults skip the guardrail (engine-side tests)
    # After a published fault, no new version goes out until the serving side has answered it (its
    # rollback or refusal) or this many seconds pass: a drill whose fault was superseded before the
    # engine looked at it would prove nothing.
    inject_hold_s: float = 120.0

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.lr is not None and not (_is_number(self.lr) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a number in (0, 1) or null, got {self.lr!r}")
        for name in ("clip", "idle_sleep_s", "segment_idle_s", "heartbeat_s"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("replay_reservoir", "cut_open_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        for name in (
            "weight_decay",
            "rejected_weight",
            "margin",
            "replay_per_step",
            "position_budget",
            "replay_half_life",
            "average_half_life",
        ):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        for name in (
            "unroll",
            "tokens_per_step",
            "max_sequence_tokens",
            "publish_every",
            "holdout_capacity",
            "checkpoint_every",
            "keep_checkpoints",
            "vocab_refresh_every",
            "read_batch",
            "replay_sequences",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.prompt_tokens, int) or isinstance(self.prompt_tokens, bool) or self.prompt_tokens < -1:
            raise ValueError(f"prompt_tokens must be an integer >= -1 (-1: all), got {self.prompt_tokens!r}")
        if self.max_sequence_tokens < MIN_SEQUENCE_TOKENS:
            raise ValueError(f"max_sequence_tokens must be at least {MIN_SEQUENCE_TOKENS}")
        if not isinstance(self.nice, int) or isinstance(self.nice, bool) or not 0 <= self.nice <= 19:
            raise ValueError(f"nice must be an integer in [0, 19], got {self.nice!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (_is_number(self.adam_beta2) and 0 < self.adam_beta2 < 1):
            raise ValueError(f"adam_beta2 must be a number in (0, 1), got {self.adam_beta2!r}")
        for name in ("holdout_fraction", "vocab_change_threshold"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value < 1):
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if not (_is_number(self.vocab_count_decay) and 0 < self.vocab_count_decay <= 1):
            raise ValueError(f"vocab_count_decay must be in (0, 1], got {self.vocab_count_decay!r}")
        if self.guardrail_on not in GUARDRAIL_DATA:
            raise ValueError(f"guardrail_on must be one of {', '.join(GUARDRAIL_DATA)}, got {self.guardrail_on!r}")
        if not isinstance(self.inject_hold_s, (int, float)) or not 0 <= self.inject_hold_s < float("inf"):
            raise ValueError(f"inject_hold_s must be a finite number of seconds >= 0, got {self.inject_hold_s!r}")
        if not isinstance(self.inject_bypass_guardrail, bool):
            raise ValueError("inject_bypass_guardrail must be true or false")
        self.inject = list(self.inject.split(",") if isinstance(self.inject, str) else (self.inject or []))
        self.inject_at()  # validates

    def inject_at(self) -> dict[int, str]:
        """{publish attempt number (1-based): fault kind}."""
        out: dict[int, str] = {}
        for item in self.inject:
            m = _INJECT.match(item) if isinstance(item, str) else None
            if not m or int(m.group(2)) < 1:
                raise ValueError(
                    f"inject entries look like 'nan@2' or 'corrupt@4' (kinds: {', '.join(INJECT_KINDS)}; "
                    f"publish numbers from 1), got {item!r}"
                )
            out[int(m.group(2))] = m.group(1)
        return out

    def resolved_lr(self, pretrained: bool) -> float:
        if self.lr is not None:
            return float(self.lr)
        return LR_FROM_PRETRAINED if pretrained else LR_FROM_RANDOM

    @classmethod
    def from_dict(cls, d: dict | None) -> TrainerConfig:
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown trainer config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)
