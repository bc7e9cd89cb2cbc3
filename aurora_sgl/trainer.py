"""The trainer sidecar: keeps the served EAGLE-3 draft head learning from the traffic it serves.

    python -m aurora_sgl.trainer --spec /path/spec.json

The launcher writes the spec (JSON) and owns every shared-memory segment; the trainer only attaches:
  ring           SignalRing.spec()  -- step records from the engine (read side)
  store          WeightStore.spec() -- where new head versions are published (version 1: launcher)
  status         TrainerStatus spec -- heartbeat and counters the server reads without blocking
  model_path     target model dir: only its input embedding and lm_head weight are kept
  init_head      EAGLE-3 checkpoint dir to start from, or null: read the store's active version
  aux_layer_ids, draft_vocab_size, config (TrainerConfig fields), checkpoint_dir, threads
  optional: parent_pid (exit when reparented), pretrained (override the lr default), device

Loop: read records -> stitch them per request into `offline_train.Sequence`s -> once
`tokens_per_step` generated tokens are in finished sequences, one `offline_train.train_step` -> every
`publish_every` steps a guardrail (simulated accept length on held-out recent sequences, candidate
vs. the served weights) decides whether `store.publish` gets the candidate. A rollback signalled
by the engine (`store.last_rollback()`) reloads the version before the rolled-back one and resets
the optimizer. The draft vocabulary follows the traffic; checkpoints are written atomically.

The trainer opens no sockets. SIGTERM / SIGINT finish the current step and exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from .draft_head import Eagle3Config, Eagle3Head
from .losses import OBJECTIVES, ttt_logits
from .offline_train import HeadBatch, Sequence, draft_vocab_from_counts, train_step
from .spec_io import read_spec
from .signal_ring import AttachedSegment, RingRecord, SharedSegment, SignalRing, create_segment
from .weight_store import WeightStore

log = logging.getLogger("aurora_sgl.trainer")

INJECT_KINDS = ("nan", "random")
_INJECT = re.compile(r"\s*(nan|random)\s*@\s*(\d+)\s*\Z")
_CKPT = re.compile(r"step_(\d{8,})\Z")
MIN_SEQUENCE_TOKENS = 3


# ---- configuration ------------------------------------------------------------------------------
@dataclass
class TrainerConfig:
    objective: str = "kl"  # "kl" | "kl_rejected" | "accept" (see losses.draft_loss)
    # None: 1e-3 from a random head, 3e-4 from a pretrained one. Aurora uses 1e-4 / 1e-5 on GPUs, where the
    # trainer takes many steps per request; on CPU it takes ~0.1 (benchmarks/README.md, traffic shift), and
    # a day-0 head's accept length over the third of three 48-request phases was 1.115 at 1e-4, 1.260 at 1e-3.
    lr: float | None = None
    clip: float = 2.5  # gradient-norm clip
    weight_decay: float = 0.0  # AdamW
    unroll: int = 5  # TTT unroll steps (weights 0.8**k live in draft_loss); also the guardrail's K
    tokens_per_step: int = 1024  # recorded positions per optimizer step (~10 requests of 32 prompt + 64 generated)
    # When the ring is empty (the trainer has caught up with the traffic), up to this many extra
    # steps per fresh step on a sample of the most recent `replay_sequences` training sequences:
    # idle compute spent on the traffic of the last minutes instead of sleeping. Sharp traffic
    # shift, online from the static head, after-shift accept length over static: 1.12 without
    # replay, 1.22 with 1, 1.26 with 3 (benchmarks/README.md).
    replay_per_step: float = 3.0
    replay_sequences: int = 64
    max_sequence_tokens: int = 512  # a request's stitched segment is cut at this length
    # Prompt positions kept per request: the last ones before the first generated token. The head
    # drafts generated tokens, and on a long prompt the prompt is most of a step's compute (a
    # 600-token prompt with 64 generated: 10x); with 32 the trainer keeps up with the traffic
    # (benchmarks/README.md, traffic shift). 0 keeps none; -1 keeps every prompt position.
    prompt_tokens: int = 32
    publish_every: int = 4  # optimizer steps between publish attempts
    rejected_weight: float = 2.0  # kl_rejected: a position whose draft was rejected weighs 1 + this
    margin: float = 0.05  # publish if sim_tau(candidate) >= sim_tau(served) - margin
    holdout_fraction: float = 0.1  # share of sequences kept out of training for the guardrail
    holdout_capacity: int = 32  # the most recent held-out sequences kept
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
    inject: list[str] = field(default_factory=list)  # faults for tests: ["nan@2", "random@4"]
    inject_bypass_guardrail: bool = False  # injected faults skip the guardrail (engine-side tests)

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.lr is not None and not (_is_number(self.lr) and 0 < self.lr < 1):
            raise ValueError(f"lr must be a number in (0, 1) or null, got {self.lr!r}")
        for name in ("clip", "idle_sleep_s", "segment_idle_s", "heartbeat_s"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        for name in ("weight_decay", "rejected_weight", "margin", "replay_per_step"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a non-negative number, got {getattr(self, name)!r}")
        for name in ("unroll", "tokens_per_step", "max_sequence_tokens", "publish_every", "holdout_capacity",
                     "checkpoint_every", "keep_checkpoints", "vocab_refresh_every", "read_batch",
                     "replay_sequences"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not isinstance(self.prompt_tokens, int) or isinstance(self.prompt_tokens, bool) or self.prompt_tokens < -1:
            raise ValueError(f"prompt_tokens must be an integer >= -1 (-1: all), got {self.prompt_tokens!r}")
        if self.max_sequence_tokens < MIN_SEQUENCE_TOKENS:
            raise ValueError(f"max_sequence_tokens must be at least {MIN_SEQUENCE_TOKENS}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        for name in ("holdout_fraction", "vocab_change_threshold"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value < 1):
                raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")
        if not (_is_number(self.vocab_count_decay) and 0 < self.vocab_count_decay <= 1):
            raise ValueError(f"vocab_count_decay must be in (0, 1], got {self.vocab_count_decay!r}")
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
                raise ValueError(f"inject entries look like 'nan@2' or 'random@4' (kinds: {', '.join(INJECT_KINDS)}; "
                                 f"publish numbers from 1), got {item!r}")
            out[int(m.group(2))] = m.group(1)
        return out

    def resolved_lr(self, pretrained: bool) -> float:
        if self.lr is not None:
            return float(self.lr)
        return 3e-4 if pretrained else 1e-3

    @classmethod
    def from_dict(cls, d: dict | None) -> "TrainerConfig":
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown trainer config keys: {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        return cls(**d)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---- status segment -----------------------------------------------------------------------------
class TrainerStatus(SharedSegment):
    """A small shared-memory float64 array the trainer writes after every step and the server reads
    without blocking. Words: magic, seq (a seqlock: odd while the trainer writes), then FIELDS."""

    FIELDS = ("heartbeat", "train_steps", "loss", "sim_tau_candidate", "sim_tau_served", "publishes", "refused",
              "rollbacks_seen", "checkpoint_failures", "records_read", "ring_drops_seen", "last_published_version",
              "replay_steps")
    _FLOAT_FIELDS = {"heartbeat", "loss", "sim_tau_candidate", "sim_tau_served"}
    _MAGIC = 0x5354415431  # "STAT1"
    _WORDS = 2 + len(FIELDS)

    def __init__(self, seg, spec: dict, owner: bool):
        self._seg, self._spec, self._owns_name = seg, spec, owner
        self._a = np.ndarray((self._WORDS,), np.float64, buffer=seg.buf)
        self._index = {name: 2 + i for i, name in enumerate(self.FIELDS)}

    @classmethod
    def create(cls, name_prefix: str) -> "TrainerStatus":
        seg = create_segment(name_prefix, cls._WORDS * 8)  # mode 0600
        a = np.ndarray((cls._WORDS,), np.float64, buffer=seg.buf)
        a[0] = cls._MAGIC
        for i, name in enumerate(cls.FIELDS):  # "never computed" until the trainer says otherwise
            a[2 + i] = math.nan if name in ("loss", "sim_tau_candidate", "sim_tau_served") else 0.0
        del a
        return cls(seg, {"name": seg.name, "fields": list(cls.FIELDS)}, owner=True)

    @classmethod
    def attach(cls, spec: dict) -> "TrainerStatus":
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


# ---- stitching ring records into sequences ----------------------------------------------------
class _Segment:
    __slots__ = ("start", "next_position", "inputs", "aux", "final", "last_next", "rejected", "length", "last_seq")

    def __init__(self, rec: RingRecord):
        self.start = rec.position
        self.inputs, self.aux, self.final, self.rejected = [], [], [], []
        self.length = 0
        self.next_position: int | None = None
        self.last_next = 0
        self.last_seq = rec.seq

    def add(self, rec: RingRecord) -> None:
        rows = rec.input_tokens.numel()
        self.inputs.append(rec.input_tokens.cpu())
        self.aux.append(rec.aux_hidden.cpu())
        self.final.append(rec.final_hidden.cpu())
        self.last_next = int(rec.next_tokens[rows - 1])
        self.length += rows
        self.last_seq = rec.seq
        rejected = (rec.outcome == 0).nonzero().flatten()
        if rejected.numel():  # draft j (0-based) proposed the token at position + j + 1
            idx = rec.position + int(rejected[0]) + 1 - self.start
            if idx <= self.length:  # beyond that a truncated record no longer covers it
                self.rejected.append(idx)
        complete = rows == rec.num_accepted + 1  # the ring truncates long records
        self.next_position = rec.position + rec.num_accepted + 1 if complete else None

    def build(self, rejected_weight: float) -> tuple[Sequence, torch.Tensor] | None:
        """Sequence of length L+1 (L recorded rows plus the final next token). The final token has
        no hidden state yet: its aux/final rows are zeros, used only at a position HeadBatch masks."""
        n = self.length + 1
        if n < MIN_SEQUENCE_TOKENS:
            return None
        tokens = torch.cat(self.inputs + [torch.tensor([self.last_next], dtype=torch.long)])
        aux = torch.cat(self.aux + [self.aux[0].new_zeros(1, self.aux[0].shape[-1])])
        final = torch.cat(self.final + [self.final[0].new_zeros(1, self.final[0].shape[-1])])
        weights = torch.ones(n)
        for idx in self.rejected:
            if 0 <= idx < n:
                weights[idx] = 1.0 + rejected_weight
        return Sequence(tokens=tokens, aux=aux, final=final, first_generated=0), weights


def is_prompt_record(rec: RingRecord) -> bool:
    """Prompt positions carry no drafts (both backends write -1 draft tokens for them)."""
    return bool((rec.draft_tokens < 0).all())


class Stitcher:
    """Joins consecutive records of one request into sequences.

    A record covers position..position+num_accepted and the next one of that request starts at
    position+num_accepted+1. A segment is closed (becomes a training sequence) when
      * the next record of its request leaves a gap (a lost or truncated record),
      * the next record would make it longer than `max_tokens`,
      * its request went quiet: every decoding request writes one record per engine step, so a
        request absent for more than 2 x (open segments) records has missed at least two steps
        (finished or aborted) -- this needs no knowledge of the engine's batch size,
      * or `close_all()` (the trainer calls it when the ring has been idle for a while).
    """

    def __init__(self, max_tokens: int = 512, rejected_weight: float = 2.0, prompt_tokens: int = -1):
        self.max_tokens = max_tokens
        self.rejected_weight = rejected_weight
        self.prompt_tokens = prompt_tokens
        # Prompt (prefill) records of requests that have not decoded yet, trimmed to the last
        # `prompt_tokens` positions; they join the request's segment with its first decode record.
        self._prompt: dict[int, deque[RingRecord]] = {}
        self._open: dict[int, _Segment] = {}
        self._done: deque[tuple[Sequence, torch.Tensor]] = deque()
        self._done_tokens = 0
        self._newest_seq = -1

    @property
    def closed_tokens(self) -> int:
        """Recorded positions in closed segments, ready for training."""
        return self._done_tokens

    @property
    def open_tokens(self) -> int:
        return sum(s.length for s in self._open.values())

    @property
    def pending_tokens(self) -> int:
        return self._done_tokens + self.open_tokens

    def add(self, records: Iterable[RingRecord]) -> None:
        for rec in records:
            self._newest_seq = max(self._newest_seq, rec.seq)
            if rec.input_tokens.numel() == 0:
                continue
            key = rec.request_hash
            if self.prompt_tokens >= 0 and is_prompt_record(rec):
                self._buffer_prompt(key, rec)
                continue
            for held in self._prompt.pop(key, ()):
                self._add_one(held)
            self._add_one(rec)
        limit = 2 * (len(self._open) + len(self._prompt))
        for key in [k for k, q in self._prompt.items() if self._newest_seq - q[-1].seq > limit]:
            self._flush_prompt(key)  # a request that ended right after its prompt
        for key in [k for k, s in self._open.items() if self._newest_seq - s.last_seq > limit]:
            self._close(key)

    def _buffer_prompt(self, key: int, rec: RingRecord) -> None:
        held = self._prompt.setdefault(key, deque())
        if held and held[-1].position + held[-1].input_tokens.numel() != rec.position:
            held.clear()  # a gap: only the part next to the generated tokens matters
        held.append(rec)
        rows = sum(r.input_tokens.numel() for r in held)
        while held and rows - held[0].input_tokens.numel() >= self.prompt_tokens:
            rows -= held.popleft().input_tokens.numel()
        if not held:
            del self._prompt[key]

    def _flush_prompt(self, key: int) -> None:
        for held in self._prompt.pop(key, ()):
            self._add_one(held)
        if key in self._open:
            self._close(key)

    def _add_one(self, rec: RingRecord) -> None:
        rows = rec.input_tokens.numel()
        seg = self._open.get(rec.request_hash)
        if seg is not None and (seg.next_position != rec.position or seg.length + rows > self.max_tokens - 1):
            self._close(rec.request_hash)
            seg = None
        if seg is None:
            seg = self._open[rec.request_hash] = _Segment(rec)
        seg.add(rec)

    def _close(self, key: int) -> None:
        seg = self._open.pop(key)
        built = seg.build(self.rejected_weight)
        if built is not None:
            self._done.append(built)
            self._done_tokens += seg.length

    def close_all(self) -> None:
        for key in list(self._prompt):
            self._flush_prompt(key)
        for key in list(self._open):
            self._close(key)

    def take(self, max_tokens: int | None = None) -> list[tuple[Sequence, torch.Tensor]]:
        """Closed segments, oldest first, as (Sequence, weights) -- weights[j] weighs the prediction
        of token j, as HeadBatch.from_sequences expects. With `max_tokens`, stop once that many
        recorded positions are taken (the rest stays for the next call)."""
        out = []
        taken = 0
        while self._done and (max_tokens is None or taken < max_tokens):
            seq, w = self._done.popleft()
            n = len(seq.tokens) - 1
            taken += n
            self._done_tokens -= n
            out.append((seq, w))
        return out


# ---- simulated accept length ---------------------------------------------------------------
def simulated_tau_per_start(step_logits: list[torch.Tensor], hot_ids: torch.Tensor, target_argmax: torch.Tensor,
                            mask: torch.Tensor) -> torch.Tensor:
    """tau_sim(s) = 1 + sum_{k<K} prod_{j<=k} agree_j(s+j), agree_j(t) = (hot_ids[argmax of unroll
    step j at t] == target_argmax[t]) and mask[t]; positions past the end never agree.
    step_logits: K x [B, T, Vd]; target_argmax, mask: [B, T]. Returns [B, T] (valid where mask)."""
    b, t = mask.shape
    run = torch.ones(b, t, dtype=torch.bool, device=mask.device)
    tau = torch.ones(b, t, dtype=torch.float64, device=mask.device)
    for j, logits in enumerate(step_logits):
        agree = (hot_ids[logits.argmax(-1)] == target_argmax) & mask
        shifted = torch.zeros_like(agree)  # shifted[s] = agree[s + j]
        if j < t:
            shifted[:, :t - j] = agree[:, j:]
        run = run & shifted
        tau += run
    return tau


@torch.no_grad()
def simulated_accept_length(head: Eagle3Head, held_out: list[tuple[Sequence, torch.Tensor]], steps: int,
                            group: int = 8) -> tuple[float, int] | None:
    """Mean simulated accept length of `head` over every valid start of the held-out sequences
    (each paired with the target's argmax per HeadBatch position), teacher-forced TTT unroll of
    `steps`; (mean, number of starts), or None when there is no valid start."""
    return _mean_of_sums(simulated_tau_sums(head, held_out, steps, group))


def _mean_of_sums(sums: Iterable[tuple[float, int]]) -> tuple[float, int] | None:
    total = count = 0
    for s, c in sums:
        total, count = total + s, count + c
    return (total / count, count) if count else None


@torch.no_grad()
def simulated_tau_sums(head: Eagle3Head, held_out: list[tuple[Sequence, torch.Tensor]], steps: int,
                       group: int = 8) -> list[tuple[float, int]]:
    """Per held-out sequence: (sum of the simulated accept length over its valid starts, number of
    starts). Causal attention makes each sequence's figure independent of its batch-mates, so the
    trainer can cache the served head's figures per sequence."""
    was_training = head.training
    head.eval()
    device = head.fc.weight.device
    out: list[tuple[float, int]] = []
    for i in range(0, len(held_out), group):
        chunk = held_out[i:i + group]
        batch = HeadBatch.from_sequences([s for s, _ in chunk])
        tgt = torch.full_like(batch.next_tokens, -1)
        for r, (_, am) in enumerate(chunk):
            tgt[r, :am.numel()] = am
        mask = batch.mask.to(device)
        logits = ttt_logits(head, batch.aux.to(device, head.fc.weight.dtype), batch.next_tokens.to(device), steps)
        tau = simulated_tau_per_start(logits, head.hot_ids, tgt.to(device), mask)
        out += zip((tau * mask).sum(1).tolist(), mask.sum(1).tolist())
    head.train(was_training)
    return out


# ---- checkpoints -----------------------------------------------------------------------------
def _checkpoint_dirs(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def newest_checkpoint(checkpoint_dir: str | Path | None) -> str | None:
    """The newest `step_*` dir under `checkpoint_dir` that loads (config.json and
    model.safetensors present and accepted by Eagle3Head.load), or None."""
    if not checkpoint_dir:
        return None
    for _, path in _checkpoint_dirs(checkpoint_dir):
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            continue
        try:
            Eagle3Head.load(path, torch.zeros(0))  # the embedding is not needed to check the tensors
        except Exception as e:  # truncated / corrupt files, bad config: try the next older one
            log.warning("checkpoint %s does not load (%s); skipping it", path, str(e).splitlines()[0] if str(e) else e)
            continue
        return str(path)
    return None


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(head: Eagle3Head, checkpoint_dir: str | Path, steps: int, state: dict, keep: int) -> Path:
    """Write `checkpoint_dir/step_<steps:08d>` atomically (temp dir + os.replace), files 0600,
    then prune to the newest `keep`. Raises on failure (the trainer counts it)."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = root / f"step_{steps:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        head.save(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
        for f in tmp.iterdir():
            os.chmod(f, 0o600)
            _fsync(f)
        os.chmod(tmp, 0o700)
        if final.exists():  # same step number again (e.g. a restart that did not resume the count)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoint_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):  # left behind by a crash mid-write
        if p != tmp:
            shutil.rmtree(p, ignore_errors=True)
    return final


# ---- the trainer ----------------------------------------------------------------------------
def load_target_weights(model_path: str) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(config, input embedding weight, lm_head weight) of the target; the rest is dropped."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, local_files_only=True)
    embed = model.get_input_embeddings().weight.detach().clone()
    out = model.get_output_embeddings()
    lm_w = (out.weight if out is not None else model.get_input_embeddings().weight).detach().clone()
    config = model.config
    del model
    return config, embed, lm_w


def _clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _finite(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


class Trainer:
    def __init__(self, spec: dict, stop_event: threading.Event | None = None, parent_pid: int | None = None):
        self.spec = spec
        self.cfg = TrainerConfig.from_dict(spec.get("config"))
        self.stop_event = stop_event or threading.Event()
        self.parent_pid = parent_pid if parent_pid is not None else spec.get("parent_pid")
        self.device = torch.device(spec.get("device") or "cpu")
        self.checkpoint_dir = spec.get("checkpoint_dir")
        self.inject = self.cfg.inject_at()
        self.rng = random.Random(self.cfg.seed)
        self.counters = {name: 0 for name in ("train_steps", "publishes", "refused", "rollbacks_seen",
                                              "checkpoint_failures", "records_read", "ring_drops_seen",
                                              "last_published_version", "replay_steps")}
        self.replay: deque[tuple[Sequence, torch.Tensor]] = deque(maxlen=self.cfg.replay_sequences)
        self._replay_credit = 0.0
        self.loss = self.tau_candidate = self.tau_served = None
        self.losses: list[float] = []
        self.history: deque[dict] = deque(maxlen=1000)  # one entry per publish attempt
        self.attempts = 0
        self.ring = self.store = self.status = None
        self._last_beat = 0.0

    # ---- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        for key in ("ring", "store", "model_path"):
            if not spec.get(key):
                raise ValueError(f"trainer spec needs '{key}'")
        if spec.get("status"):
            self.status = TrainerStatus.attach(spec["status"])
            self.beat()
        self.ring = SignalRing.attach(spec["ring"])
        self.store = WeightStore.attach(spec["store"])
        config, embed, lm_w = load_target_weights(spec["model_path"])
        self.lm_w = lm_w.to(self.device)
        self.vocab_size = config.vocab_size
        self.embed = embed.to(self.device)
        init_head = spec.get("init_head")
        pretrained = bool(spec.get("pretrained", init_head is not None))
        served = self._wait_for_store()
        if served is None:  # stopped while waiting
            return
        version, served_state = served
        if init_head:
            head = Eagle3Head.load(init_head, self.embed, device=self.device)
            self._resume_counters(Path(init_head))
        else:
            layout = self.store.layout
            dvs = layout["lm_head.weight"][0][0] if "lm_head.weight" in layout else spec.get("draft_vocab_size")
            aux = spec.get("aux_layer_ids")
            if not aux:
                raise ValueError("trainer spec needs 'aux_layer_ids' when init_head is null")
            head = Eagle3Head(Eagle3Config.for_target(config, dvs, aux), self.embed).to(self.device)
        self._check_layout(head)
        if not init_head:
            head.load_serving_state(served_state)
        want = spec.get("draft_vocab_size")
        if want and want != head.config.draft_vocab_size:
            log.warning("spec draft_vocab_size %s differs from the head's %s; using the head's",
                        want, head.config.draft_vocab_size)
        self.head = head.train().requires_grad_(True)
        self.eval_head = Eagle3Head(head.config, self.embed).to(self.device).requires_grad_(False).eval()
        self.lr = self.cfg.resolved_lr(pretrained)
        self.opt = self._new_optimizer()
        self.served_state = served_state
        self.kept: deque[tuple[int, dict]] = deque([(version, served_state)], maxlen=2)
        self.rollback_handled = self.store.last_rollback()
        self.counters["last_published_version"] = version
        self.stitcher = Stitcher(self.cfg.max_sequence_tokens, self.cfg.rejected_weight, self.cfg.prompt_tokens)
        self.holdout: deque[tuple[Sequence, torch.Tensor]] = deque(maxlen=self.cfg.holdout_capacity)
        self._served_sums: dict[int, tuple] = {}  # id(held-out entry) -> (entry, served weights' tau sums)
        self._served_sums_of: dict | None = None  # the served state those sums belong to
        self.counts = torch.zeros(self.vocab_size, dtype=torch.float64)
        log.info("trainer ready: objective %s lr %g unroll %d, served version %d, head from %s",
                 self.cfg.objective, self.lr, self.cfg.unroll, version, init_head or "the weight store")

    def _wait_for_store(self) -> tuple[int, dict] | None:
        """The store's active version and a copy of its tensors (the launcher publishes version 1
        before starting the trainer; wait for it otherwise)."""
        while not self.should_stop():
            polled = self.store.poll(0)
            if polled is not None:
                version, views = polled
                state = {n: v.detach().clone() for n, v in zip(self.store.names, views)}
                if self.store.verify(version):
                    return version, {k: v.to(self.device) for k, v in state.items()}
            time.sleep(0.05)
            self.beat()
        return None

    def _check_layout(self, head: Eagle3Head) -> None:
        own = {n: tuple(t.shape) for n, t in head.serving_state().items()}
        store = {n: s for n, (s, _) in self.store.layout.items()}
        if own != store:
            diff = sorted(n for n in set(own) | set(store) if own.get(n) != store.get(n))
            raise ValueError(f"the draft head does not match the weight store's layout (differs at: {', '.join(diff)})")

    def _resume_counters(self, path: Path) -> None:
        """Continue the step count of the checkpoint we start from, so new checkpoints sort after it."""
        try:
            st = json.loads((path / "trainer_state.json").read_text())
            self.counters["train_steps"] = int(st.get("steps", 0))
        except (OSError, ValueError, TypeError):
            pass

    def _new_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.head.parameters(), lr=self.lr, weight_decay=self.cfg.weight_decay)

    # ---- status ---------------------------------------------------------------------------
    def beat(self) -> None:
        self._last_beat = time.monotonic()
        if self.status is None:
            return
        self.status.write(heartbeat=time.time(), loss=self.loss, sim_tau_candidate=self.tau_candidate,
                          sim_tau_served=self.tau_served, **self.counters)

    def snapshot(self) -> dict:
        return {**self.counters, "loss": self.loss, "sim_tau_candidate": self.tau_candidate,
                "sim_tau_served": self.tau_served, "losses": list(self.losses), "publish_attempts": self.attempts,
                "history": list(self.history)}

    def should_stop(self) -> bool:
        if self.stop_event.is_set():
            return True
        if self.parent_pid is not None and os.getppid() != self.parent_pid:
            log.warning("the server process (pid %s) went away; stopping", self.parent_pid)
            self.stop_event.set()
            return True
        return False

    # ---- main loop ------------------------------------------------------------------------
    def run(self) -> dict:
        self.setup()
        if self.should_stop():
            return self.snapshot()
        last_record = time.monotonic()
        while not self.should_stop():
            self.check_rollback()
            if self.stitcher.closed_tokens >= self.cfg.tokens_per_step:
                self.train_once()
                self.beat()
                continue
            # Read only when a step needs more data: a trainer slower than the traffic lets the
            # ring drop the oldest records (counted) instead of growing a backlog here.
            records = self.ring.read(self.cfg.read_batch)
            now = time.monotonic()
            if records:
                self.ingest(records)
                last_record = now
                continue
            if self._replay_credit >= 1 and self.replay:
                self._replay_credit -= 1
                self.replay_once()
                self.beat()
                continue
            if self.stitcher.open_tokens and now - last_record >= self.cfg.segment_idle_s:
                self.stitcher.close_all()  # the engine is idle: its requests are done
                continue
            if now - self._last_beat >= self.cfg.heartbeat_s:
                self.beat()
            time.sleep(self.cfg.idle_sleep_s)
        self.beat()
        return self.snapshot()

    def ingest(self, records: list[RingRecord]) -> None:
        self.counters["records_read"] += len(records)
        self.counters["ring_drops_seen"] = self.ring.stats()["drops"]
        for r in records:
            tok = r.next_tokens.cpu()
            tok = tok[(tok >= 0) & (tok < self.vocab_size)]
            self.counts.index_add_(0, tok, torch.ones(tok.numel(), dtype=torch.float64))
        self.stitcher.add(records)

    def train_once(self) -> None:
        train = []
        for seq, w in self.stitcher.take(self.cfg.tokens_per_step):
            if self.cfg.holdout_fraction and self.rng.random() < self.cfg.holdout_fraction:
                self.holdout.append((seq, self._target_argmax(seq)))
            else:
                train.append((seq, w))
        if not train:
            return
        self.replay.extend(train)
        self._replay_credit = self.cfg.replay_per_step  # replay fills idle time until the next fresh step
        self._train_on(train)

    def replay_once(self) -> None:
        """One step on recent sequences already trained on, drawn at random up to a step's tokens."""
        pool = list(self.replay)
        self.rng.shuffle(pool)
        train, tokens = [], 0
        for seq, w in pool:
            if tokens >= self.cfg.tokens_per_step:
                break
            train.append((seq, w))
            tokens += len(seq.tokens) - 1
        self.counters["replay_steps"] += 1
        self._train_on(train)

    def _train_on(self, train: list[tuple[Sequence, torch.Tensor]]) -> None:
        weights = [w for _, w in train] if self.cfg.objective == "kl_rejected" else None
        batch = HeadBatch.from_sequences([s for s, _ in train], weights)
        if self.device.type != "cpu":
            batch = HeadBatch(*(t.to(self.device) if t is not None else None for t in
                                (batch.aux, batch.next_tokens, batch.final_next, batch.mask, batch.position_weight)))
        stats = train_step(self.head, self.opt, self.lm_w, batch, self.cfg.unroll, self.cfg.objective, self.cfg.clip)
        self.head.train()
        self.counters["train_steps"] += 1
        self.loss = stats["loss"]
        self.losses.append(stats["loss"])
        if self.counters["train_steps"] % self.cfg.publish_every == 0:
            self.publish_round()

    @torch.no_grad()
    def _target_argmax(self, seq: Sequence) -> torch.Tensor:
        """Target argmax per HeadBatch position t (the target's token x_{t+2}); frozen, so cached."""
        return (seq.final[1:].to(self.device) @ self.lm_w.T).argmax(-1).cpu()

    # ---- publish with guardrail -----------------------------------------------------------
    def _candidate(self, fault: str | None) -> dict[str, torch.Tensor]:
        state = _clone_state(self.head.serving_state())
        if fault == "nan":
            for t in state.values():
                if t.is_floating_point():
                    t.fill_(float("nan"))
        elif fault == "random":
            gen = torch.Generator().manual_seed(self.cfg.seed + 7919 * self.attempts)
            for name, t in state.items():
                if t.is_floating_point():
                    t.copy_(torch.randn(t.shape, generator=gen) * float(t.float().std().clamp(min=1e-3)))
        return state

    def _sim_tau_sums(self, state: dict[str, torch.Tensor], entries: list) -> list[tuple[float, int]]:
        if not entries:
            return []
        self.eval_head.load_serving_state(state)
        return simulated_tau_sums(self.eval_head, entries, self.cfg.unroll)

    def _served_sim_tau(self) -> float | None:
        """The served weights' simulated tau on the held-out set. Their per-sequence figures are kept
        until the served weights change, so each round evaluates them only on sequences held out
        since: the guardrail then costs about one evaluation per round instead of two."""
        if self._served_sums_of is not self.served_state:
            self._served_sums, self._served_sums_of = {}, self.served_state
        entries = list(self.holdout)
        missing = [e for e in entries if id(e) not in self._served_sums]
        for e, sums in zip(missing, self._sim_tau_sums(self.served_state, missing)):
            self._served_sums[id(e)] = (e, sums)  # the entry itself is kept so its id stays unique
        live = {id(e) for e in entries}
        self._served_sums = {k: v for k, v in self._served_sums.items() if k in live}
        res = _mean_of_sums(sums for _, sums in self._served_sums.values())
        return None if res is None else res[0]

    def publish_round(self) -> bool:
        self.attempts += 1
        fault = self.inject.get(self.attempts)
        state = self._candidate(fault)
        entry = {"attempt": self.attempts, "step": self.counters["train_steps"], "fault": fault,
                 "sim_tau_candidate": None, "sim_tau_served": None, "published": False, "reason": None}
        self.history.append(entry)
        if fault is not None:
            log.warning("injecting a %s head at publish attempt %d%s", fault, self.attempts,
                        " (bypassing the guardrail)" if self.cfg.inject_bypass_guardrail else "")
        if fault is not None and self.cfg.inject_bypass_guardrail:
            entry["reason"] = "bypass"
        else:
            if not _finite(state):
                self.counters["refused"] += 1
                entry["reason"] = "non-finite"
                log.warning("refused to publish non-finite weights (attempt %d)", self.attempts)
                if fault is None:  # the training head itself diverged: back to the last sane weights
                    self._load_into_head(self.served_state if _finite(self.served_state) else self.kept[-1][1])
                return False
            entries = list(self.holdout)
            candidate_sums = self._sim_tau_sums(state, entries)
            res = _mean_of_sums(candidate_sums)
            self.tau_candidate = entry["sim_tau_candidate"] = None if res is None else res[0]
            self.tau_served = entry["sim_tau_served"] = self._served_sim_tau()
            if self.tau_candidate is not None and self.tau_served is not None \
                    and self.tau_candidate < self.tau_served - self.cfg.margin:
                self.counters["refused"] += 1
                entry["reason"] = "guardrail"
                log.info("guardrail refused attempt %d: sim tau %.3f vs served %.3f", self.attempts,
                         self.tau_candidate, self.tau_served)
                return False
            entry["reason"] = "passed" if self.tau_candidate is not None else "no held-out data"
        version = self.store.publish(state)
        entry["published"], entry["version"] = True, version
        self.counters["publishes"] += 1
        self.counters["last_published_version"] = version
        self.served_state = state
        if fault is None or not self.cfg.inject_bypass_guardrail:  # the candidate's figures are now the served ones
            self._served_sums = {id(e): (e, s) for e, s in zip(entries, candidate_sums)}
            self._served_sums_of = state
        if _finite(state):  # a rollback never goes back to non-finite weights (bypassed injections)
            self.kept.append((version, state))
        log.info("published version %d (step %d, sim tau %s vs %s)", version, self.counters["train_steps"],
                 self.tau_candidate, self.tau_served)
        n = self.counters["publishes"]
        if self.checkpoint_dir and n % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        if n % self.cfg.vocab_refresh_every == 0:
            self.refresh_vocab()
        return True

    def _load_into_head(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_serving_state(state)
        self.opt = self._new_optimizer()

    # ---- rollback -------------------------------------------------------------------------
    def check_rollback(self) -> None:
        v = self.store.last_rollback()
        if v <= self.rollback_handled:
            return
        self.rollback_handled = v
        self.counters["rollbacks_seen"] += 1
        earlier = [(ver, st) for ver, st in self.kept if ver < v]
        self.kept = deque([(ver, st) for ver, st in self.kept if ver != v], maxlen=2)
        if earlier:
            ver, st = earlier[-1]
            self._load_into_head(st)
            self.served_state = st
            log.warning("the engine rolled back version %d: training resumes from version %d", v, ver)
        else:
            self.opt = self._new_optimizer()
            log.warning("the engine rolled back version %d; no earlier state kept, optimizer reset", v)
        self.beat()

    # ---- draft vocabulary -----------------------------------------------------------------
    @torch.no_grad()
    def refresh_vocab(self) -> bool:
        size = self.head.config.draft_vocab_size
        if self.counts.sum() == 0:
            return False
        new = draft_vocab_from_counts(self.counts, size).to(self.device)
        self.counts *= self.cfg.vocab_count_decay
        old = self.head.hot_ids
        changed = size - int(torch.isin(new, old).sum())
        if changed / size <= self.cfg.vocab_change_threshold:
            return False
        old_index = torch.full((self.vocab_size,), -1, dtype=torch.long, device=self.device)
        old_index[old] = torch.arange(size, device=self.device)
        src = old_index[new]
        keep = src >= 0

        def remap(t: torch.Tensor) -> torch.Tensor:
            out = torch.zeros_like(t)
            out[keep] = t[src[keep]]
            return out

        w = self.head.lm_head.weight
        w.copy_(remap(w))  # in place: the optimizer keeps the same parameter
        st = self.opt.state.get(w)
        for key in ("exp_avg", "exp_avg_sq"):
            if st and key in st:
                st[key].copy_(remap(st[key]))
        self.head.set_draft_vocab(new)
        log.info("draft vocabulary refreshed: %d of %d hot ids changed", changed, size)
        return True

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint(self) -> None:
        if not _finite(self.head.serving_state()):
            return
        state = {"steps": self.counters["train_steps"], "publishes": self.counters["publishes"],
                 "version": self.counters["last_published_version"], "lr": self.lr, "config": asdict(self.cfg)}
        try:
            path = save_checkpoint(self.head, self.checkpoint_dir, self.counters["train_steps"], state,
                                   self.cfg.keep_checkpoints)
            log.info("checkpoint %s", path)
        except Exception as e:  # unwritable or full disk: serving and training go on
            self.counters["checkpoint_failures"] += 1
            log.error("checkpoint to %s failed: %s", self.checkpoint_dir, e)

    def close(self) -> None:
        for obj in (self.ring, self.store, self.status):
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass


def run_trainer(spec: dict, stop_event: threading.Event | None = None, *, parent_pid: int | None = None) -> dict:
    """Run until `stop_event` is set (or the parent process goes away). Returns the final counters
    plus the loss of every step."""
    torch.set_num_threads(int(spec.get("threads") or 1))
    trainer = Trainer(spec, stop_event, parent_pid)
    try:
        return trainer.run()
    finally:
        trainer.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m aurora_sgl.trainer", description=__doc__.splitlines()[0])
    ap.add_argument("--spec", required=True, help="JSON spec written by the launcher")
    ap.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: finishing the current step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    parent = os.getppid()
    try:
        spec = read_spec(args.spec)  # JSON, plus CUDA IPC handles from the file beside it
        run_trainer(spec, stop, parent_pid=spec.get("parent_pid", parent))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
