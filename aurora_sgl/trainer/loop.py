"""The trainer sidecar: keeps the served EAGLE-3 draft head learning from the traffic it serves.

    python -m aurora_sgl.trainer --spec /path/spec.json

The launcher writes a `TrainerSpec` (JSON: the segments to attach, the target model, the head to
start from, the `TrainerConfig`) and owns every shared-memory segment; the trainer only attaches.

Loop: read records (from one ring, or one per SGLang data-parallel replica: `transport.ring_set`)
-> stitch them per request into `Sequence`s (`stitcher`) -> once
`tokens_per_step` generated tokens are in finished sequences, one `training.offline.train_step` -> every
`publish_every` steps a guardrail (simulated accept length on the newest sequences, scored before
the trainer learned from them, candidate vs. the served weights) decides whether `store.publish`
gets the candidate. A rollback signalled by the engine (`store.last_rollback()`) reloads the
version before the rolled-back one and resets the optimizer. The draft vocabulary follows the
traffic; checkpoints are written atomically.

The trainer opens no sockets. SIGTERM / SIGINT finish the current step and exit 0.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from aurora_sgl.engine.draft_head import Eagle3Config, Eagle3Head
from aurora_sgl.trainer.checkpoints import save_checkpoint, served_dtype
from aurora_sgl.trainer.faults import faulty_state, finite_state
from aurora_sgl.trainer.guardrail import mean_of_sums, simulated_tau_sums
from aurora_sgl.trainer.replay import recency_log_weights, weighted_order
from aurora_sgl.trainer.spec import TrainerSpec
from aurora_sgl.trainer.stitcher import Stitcher
from aurora_sgl.training.averaging import decay_for_half_life, update_average
from aurora_sgl.training.batches import HeadBatch, Sequence, draft_vocab_from_counts, train_step
from aurora_sgl.transport.handoff import read_handoff
from aurora_sgl.transport.ring_set import RingSet
from aurora_sgl.transport.signal_ring import RingRecord, SignalRing
from aurora_sgl.transport.trainer_status import TrainerStatus
from aurora_sgl.transport.weight_store import WeightStore

log = logging.getLogger("aurora_sgl.trainer")


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


class Trainer:
    def __init__(
        self, spec: TrainerSpec | dict, stop_event: threading.Event | None = None, parent_pid: int | None = None
    ):
        self.spec = spec = TrainerSpec.coerce(spec)
        self.cfg = spec.trainer_config
        self.stop_event = stop_event or threading.Event()
        self.parent_pid = parent_pid if parent_pid is not None else spec.parent_pid
        self.device = torch.device(spec.device)
        self.checkpoint_dir = spec.checkpoint_dir
        self.inject = self.cfg.inject_at()
        self._fault_unanswered: tuple[int, float] | None = None  # (version, published at): see inject_hold_s
        self.rng = random.Random(self.cfg.seed)
        self.counters = {name: 0 for name in TrainerStatus.COUNTERS}
        self.replay: deque[tuple[Sequence, torch.Tensor]] = deque(maxlen=self.cfg.replay_sequences)
        self.reservoir: list[tuple[Sequence, torch.Tensor]] = []  # uniform over everything trained on
        self._reservoir_seen = 0
        self._replay_credit = 0.0
        self.avg_head: Eagle3Head | None = None  # the moving average, when average_half_life is set (setup)
        self.loss = self.tau_candidate = self.tau_served = self.last_step_time = None
        self.losses: list[float] = []
        self.history: deque[dict] = deque(maxlen=1000)  # one entry per publish attempt
        self.attempts = 0
        self.ring = self.store = self.status = None
        self._last_beat = 0.0

    # ---- setup ----------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        if spec.status:
            self.status = TrainerStatus.attach(spec.status)
            self.beat()
        self.ring = RingSet(SignalRing.attach(spec.ring), spec.ring_dir)
        self.store = WeightStore.attach(spec.store)
        config, embed, lm_w = load_target_weights(spec.model_path)
        self.lm_w = lm_w.to(self.device)
        self.vocab_size = config.vocab_size
        self.embed = embed.to(self.device)
        init_head = spec.init_head
        served = self._wait_for_store()
        if served is None:  # stopped while waiting
            return
        version, served_state = served
        if init_head:
            head = Eagle3Head.load(init_head, self.embed, device=self.device)
            self._resume_counters(Path(init_head))
        else:
            layout = self.store.layout
            dvs = layout["lm_head.weight"][0][0] if "lm_head.weight" in layout else spec.draft_vocab_size
            head = Eagle3Head(Eagle3Config.for_target(config, dvs, spec.aux_layer_ids), self.embed).to(self.device)
        self._check_layout(head)
        head.config.dtype = served_dtype(self.store.layout)  # checkpoints: trained fp32, saved as served
        if not init_head or spec.weights_from_store:
            head.load_serving_state(served_state)
        want = spec.draft_vocab_size
        if want and want != head.config.draft_vocab_size:
            log.warning(
                "spec draft_vocab_size %s differs from the head's %s; using the head's",
                want,
                head.config.draft_vocab_size,
            )
        self.head = head.train().requires_grad_(True)
        self.eval_head = Eagle3Head(head.config, self.embed).to(self.device).requires_grad_(False).eval()
        # What is judged, published and checkpointed: the training head, or its moving average.
        if self.cfg.average_half_life:
            self.avg_head = Eagle3Head(head.config, self.embed).to(self.device).requires_grad_(False).eval()
            self.avg_head.load_serving_state(head.serving_state())
            self.avg_decay = decay_for_half_life(self.cfg.average_half_life)
        self._eval_holds: dict | None = None  # the state dict eval_head was last loaded with
        self.lr = self.cfg.resolved_lr(spec.starts_pretrained)
        self.opt = self._new_optimizer()
        self.served_state = served_state
        self.kept: deque[tuple[int, dict]] = deque([(version, served_state)], maxlen=2)
        self.rollback_handled = self.store.last_rollback()
        self.counters["last_published_version"] = version
        self.stitcher = Stitcher(self.cfg.max_sequence_tokens, self.cfg.rejected_weight, self.cfg.prompt_tokens)
        self.holdout: deque[tuple[Sequence, torch.Tensor]] = deque(maxlen=self.cfg.holdout_capacity)
        self._served_sums: dict[int, tuple] = {}  # id(held-out entry) -> (entry, served weights' tau sums)
        self._served_sums_of: dict | None = None  # the served state those sums belong to
        # guardrail_on "fresh": (entry, training head's tau sums, served head's tau sums), each
        # scored when the sequence arrived, before any step learned from it.
        self.judged: deque[tuple[tuple[Sequence, torch.Tensor], tuple, tuple]] = deque(maxlen=self.cfg.holdout_capacity)
        self.counts = torch.zeros(self.vocab_size, dtype=torch.float64)
        log.info(
            "trainer ready: objective %s lr %g unroll %d, served version %d, head from %s",
            self.cfg.objective,
            self.lr,
            self.cfg.unroll,
            version,
            init_head or "the weight store",
        )

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
        return torch.optim.AdamW(
            self.head.parameters(), lr=self.lr, weight_decay=self.cfg.weight_decay, betas=(0.9, self.cfg.adam_beta2)
        )

    # ---- status ---------------------------------------------------------------------------
    def beat(self) -> None:
        self._last_beat = time.monotonic()
        if self.status is None:
            return
        self.status.write(
            heartbeat=time.time(),
            last_step_time=self.last_step_time,
            loss=self.loss,
            sim_tau_candidate=self.tau_candidate,
            sim_tau_served=self.tau_served,
            **self.counters,
        )

    def snapshot(self) -> dict:
        return {
            **self.counters,
            "loss": self.loss,
            "sim_tau_candidate": self.tau_candidate,
            "sim_tau_served": self.tau_served,
            "losses": list(self.losses),
            "publish_attempts": self.attempts,
            "history": list(self.history),
        }

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
            if self.cfg.position_budget > 0:
                last_record = self._budgeted_round(last_record)
                continue
            if self.stitcher.closed_tokens >= self.cfg.tokens_per_step:
                self._guarded(self.train_once)
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
            if self._cut_open():
                self._guarded(self.train_once)
                self.beat()
                continue
            if self._replay_credit >= 1 and self.replay:
                self._replay_credit -= 1
                self._guarded(self.replay_once)
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

    def _budgeted_round(self, last_record: float) -> float:
        """One round of the modelled trainer device (`position_budget`): read everything recorded,
        then one step if the trained positions are below budget x recorded -- fresh sequences
        first, else a replay of recent ones. Returns when records last arrived."""
        records = self.ring.read(self.cfg.read_batch)
        now = time.monotonic()
        if records:
            self.ingest(records)
            return now
        budget = self.cfg.position_budget * self.counters["recorded_positions"]
        # A cut's context rows cost the device as much as trained ones: they count against it.
        if self.counters["trained_positions"] + self.counters["context_positions"] < budget:
            if (
                self.stitcher.closed_tokens >= self.cfg.tokens_per_step
                or (self.stitcher.closed_tokens and now - last_record >= self.cfg.segment_idle_s)
                or self._cut_open()
            ):
                self._guarded(self.train_once)
                self.beat()
                return last_record
            if self.replay:
                self._guarded(self.replay_once)
                self.beat()
                return last_record
        if self.stitcher.open_tokens and now - last_record >= self.cfg.segment_idle_s:
            self.stitcher.close_all()  # the engine is idle: its requests are done
            return last_record
        if now - self._last_beat >= self.cfg.heartbeat_s:
            self.beat()
        time.sleep(self.cfg.idle_sleep_s)
        return last_record

    def _cut_open(self) -> bool:
        """Cut running requests' new rows into training sequences (cut_open_positions), when on."""
        return bool(self.cfg.cut_open_positions) and self.stitcher.cut_open(self.cfg.cut_open_positions) > 0

    def _guarded(self, step) -> None:
        """Run one step; an error in it drops that step's batch and is counted, never the trainer:
        traffic must not be able to switch training off (only `step_failures` in /metrics shows it)."""
        try:
            step()
        except Exception:
            self.counters["step_failures"] += 1
            log.exception("a training step failed (%d so far); its batch is dropped", self.counters["step_failures"])

    def ingest(self, records: list[RingRecord]) -> None:
        self.counters["records_read"] += len(records)
        self.counters["recorded_positions"] += sum(r.input_tokens.numel() for r in records)
        self.counters["ring_drops_seen"] = self.ring.stats()["drops"]
        for r in records:
            tok = r.next_tokens.cpu()
            tok = tok[(tok >= 0) & (tok < self.vocab_size)]
            self.counts.index_add_(0, tok, torch.ones(tok.numel(), dtype=torch.float64))
        self.stitcher.add(records)

    def train_once(self) -> None:
        train = []
        held_out = self.cfg.guardrail_on == "held_out" and self.cfg.holdout_fraction
        for seq, w in self.stitcher.take(self.cfg.tokens_per_step):
            if held_out and self.rng.random() < self.cfg.holdout_fraction:
                self.holdout.append((seq, self._target_argmax(seq)))
            else:
                train.append((seq, w))
        if not train:
            return
        if self.cfg.guardrail_on == "fresh":
            self._judge_fresh([s for s, _ in train])
        self.replay.extend(train)
        self._add_to_reservoir(train)
        self._replay_credit = self.cfg.replay_per_step  # replay fills idle time until the next fresh step
        self._train_on(train, fresh=True)

    def _add_to_reservoir(self, train: list[tuple[Sequence, torch.Tensor]]) -> None:
        for item in train:  # reservoir sampling: each sequence seen is kept with equal probability
            self._reservoir_seen += 1
            if len(self.reservoir) < self.cfg.replay_reservoir:
                self.reservoir.append(item)
            elif self.cfg.replay_reservoir:
                j = self.rng.randrange(self._reservoir_seen)
                if j < self.cfg.replay_reservoir:
                    self.reservoir[j] = item

    def replay_once(self) -> None:
        """One step on sequences already trained on, drawn at random up to a step's tokens: from the
        recent ones, or (every other step on average, a step often holding one sequence) from the
        reservoir of all history when there is one."""
        use_reservoir = bool(self.reservoir) and self.rng.random() < 0.5
        if use_reservoir:
            pool = list(self.reservoir)
            self.rng.shuffle(pool)
        else:  # oldest first; weighted towards the newest (replay_half_life)
            pool = list(self.replay)
            order = weighted_order(recency_log_weights(len(pool), self.cfg.replay_half_life), self.rng)
            pool = [pool[i] for i in order]
        train, tokens = [], 0
        for seq, w in pool:
            if tokens >= self.cfg.tokens_per_step:
                break
            train.append((seq, w))
            tokens += len(seq.tokens) - 1
        self.counters["replay_steps"] += 1
        self._train_on(train)

    def _train_on(self, train: list[tuple[Sequence, torch.Tensor]], fresh: bool = False) -> None:
        weights = [w for _, w in train] if self.cfg.objective == "kl_rejected" else None
        batch = HeadBatch.from_sequences([s for s, _ in train], weights)
        if self.device.type != "cpu":
            batch = HeadBatch(
                *(
                    t.to(self.device) if t is not None else None
                    for t in (batch.aux, batch.next_tokens, batch.final_next, batch.mask, batch.position_weight)
                )
            )
        stats = train_step(self.head, self.opt, self.lm_w, batch, self.cfg.unroll, self.cfg.objective, self.cfg.clip)
        self.head.train()
        if self.avg_head is not None:
            update_average(self.avg_head, self.head, self.avg_decay)
        positions = int(batch.mask.sum())
        self.counters["train_steps"] += 1
        self.counters["trained_positions"] += positions
        # Rows the step ran over only as context (those before a cut's new positions).
        self.counters["context_positions"] += sum(len(s.tokens) - 2 for s, _ in train) - positions
        if fresh:
            self.counters["fresh_positions"] += positions
        self.last_step_time = time.time()
        self.loss = stats["loss"]
        self.losses.append(stats["loss"])
        if self.counters["train_steps"] % self.cfg.publish_every == 0:
            self.publish_round()

    @torch.no_grad()
    def _target_argmax(self, seq: Sequence) -> torch.Tensor:
        """Target argmax per HeadBatch position t (the target's token x_{t+2}); frozen, so cached."""
        return (seq.final[1:].to(self.device) @ self.lm_w.T).argmax(-1).cpu()

    # ---- publish with guardrail -----------------------------------------------------------
    def _judge_fresh(self, seqs: list[Sequence]) -> None:
        """Score new sequences with the candidate head (the training head, or its average) and the
        served head before a step learns from them: the candidate a few steps before a publish stands
        for the one published (prequential evaluation), and the guardrail always judges on the
        traffic of the last minutes."""
        entries = [(s, self._target_argmax(s)) for s in seqs]
        mine = simulated_tau_sums(self.candidate_head, entries, self.cfg.unroll)
        served = self._sim_tau_sums(self.served_state, entries)
        self.judged.extend(zip(entries, mine, served))

    def _sim_tau_sums(self, state: dict[str, torch.Tensor], entries: list) -> list[tuple[float, int]]:
        if not entries:
            return []
        # State dicts are snapshots (never changed in place): the fresh guardrail scores against
        # the served weights every fresh step, and reloading them each time is a copy of the head.
        if self._eval_holds is not state:
            self.eval_head.load_serving_state(state)
            self._eval_holds = state
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
        res = mean_of_sums(sums for _, sums in self._served_sums.values())
        return None if res is None else res[0]

    def publish_round(self) -> bool:
        """One publish attempt: the candidate (the training head, or an injected fault), the
        guardrail, the publish, then the periodic checkpoint and vocabulary refresh."""
        if self._fault_held():
            return False
        self.attempts += 1
        fault = self.inject.get(self.attempts)
        state = faulty_state(self.candidate_head.serving_state(), fault, seed=self.cfg.seed + 7919 * self.attempts)
        entry = {
            "attempt": self.attempts,
            "step": self.counters["train_steps"],
            "fault": fault,
            "sim_tau_candidate": None,
            "sim_tau_served": None,
            "published": False,
            "reason": None,
        }
        self.history.append(entry)
        # A corrupted buffer is a transport fault the guardrail cannot see: it always goes out.
        bypass = fault is not None and (self.cfg.inject_bypass_guardrail or fault == "corrupt")
        if fault is not None:
            log.warning(
                "injecting a %s head at publish attempt %d%s",
                fault,
                self.attempts,
                " (bypassing the guardrail)" if bypass else "",
            )
        candidate_sums = None
        if bypass:
            entry["reason"] = "bypass"
        else:
            candidate_sums = self._guardrail(state, entry, fault)
            if candidate_sums is None:
                return False
        self._publish(state, entry, fault, candidate_sums)
        n = self.counters["publishes"]
        if self.checkpoint_dir and n % self.cfg.checkpoint_every == 0:
            self.checkpoint()
        if n % self.cfg.vocab_refresh_every == 0:
            self.refresh_vocab()
        return True

    def _fault_held(self) -> bool:
        """True while a published fault waits for the serving side's answer (`inject_hold_s`)."""
        if self._fault_unanswered is None:
            return False
        version, since = self._fault_unanswered
        if self.store.last_rollback() >= version or time.monotonic() - since > self.cfg.inject_hold_s:
            self._fault_unanswered = None
            return False
        return True

    def _guardrail(self, state: dict[str, torch.Tensor], entry: dict, fault: str | None) -> list | None:
        """The candidate's per-sequence simulated tau sums if it may be published, else None (and
        the refusal counted): non-finite weights, or a simulated accept length more than `margin`
        below the served weights' on the same held-out sequences."""
        if not finite_state(state):
            self.counters["refused"] += 1
            entry["reason"] = "non-finite"
            log.warning("refused to publish non-finite weights (attempt %d)", self.attempts)
            if fault is None:  # the training head itself diverged: back to the last sane weights
                self._load_into_head(self.served_state if finite_state(self.served_state) else self.kept[-1][1])
            return None
        if self.cfg.guardrail_on == "fresh":
            judged = list(self.judged)
            # An injected fault is not the training head: score it itself (it never trained on these).
            mine = [m for _, m, _ in judged] if fault is None else self._sim_tau_sums(state, [e for e, _, _ in judged])
            res, served = mean_of_sums(mine), mean_of_sums(s for _, _, s in judged)
            entries, candidate_sums = [], []  # nothing to cache: every sequence is scored once
            served_tau = None if served is None else served[0]
        else:
            entries = list(self.holdout)
            candidate_sums = self._sim_tau_sums(state, entries)
            res = mean_of_sums(candidate_sums)
            served_tau = self._served_sim_tau()
        self.tau_candidate = entry["sim_tau_candidate"] = None if res is None else res[0]
        self.tau_served = entry["sim_tau_served"] = served_tau
        if (
            self.tau_candidate is not None
            and self.tau_served is not None
            and self.tau_candidate < self.tau_served - self.cfg.margin
        ):
            self.counters["refused"] += 1
            entry["reason"] = "guardrail"
            log.info(
                "guardrail refused attempt %d: sim tau %.3f vs served %.3f",
                self.attempts,
                self.tau_candidate,
                self.tau_served,
            )
            return None
        entry["reason"] = "passed" if self.tau_candidate is not None else "no held-out data"
        return list(zip(entries, candidate_sums))

    def _publish(
        self, state: dict[str, torch.Tensor], entry: dict, fault: str | None, candidate_sums: list | None
    ) -> None:
        version = self.store.publish(state, corrupt=fault == "corrupt")
        entry["published"], entry["version"] = True, version
        self.counters["publishes"] += 1
        self.counters["last_published_version"] = version
        self.served_state = state
        if fault is not None:
            self._fault_unanswered = (version, time.monotonic())
        if candidate_sums is not None:  # the candidate's figures are now the served ones
            self._served_sums = {id(e): (e, s) for e, s in candidate_sums}
            self._served_sums_of = state
        if finite_state(state) and fault != "corrupt":  # a rollback never goes back to a faulty version
            self.kept.append((version, state))
        log.info(
            "published version %d (step %d, sim tau %s vs %s)",
            version,
            self.counters["train_steps"],
            self.tau_candidate,
            self.tau_served,
        )

    def _load_into_head(self, state: dict[str, torch.Tensor]) -> None:
        self.head.load_serving_state(state)
        if self.avg_head is not None:  # the average of iterates that were rolled back means nothing
            self.avg_head.load_serving_state(state)
        self.opt = self._new_optimizer()

    @property
    def candidate_head(self) -> Eagle3Head:
        """The head a publish sends out: the moving average of the training weights when
        `average_half_life` is set, else the training head itself."""
        return self.avg_head if self.avg_head is not None else self.head

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
        if self.avg_head is not None:
            self.avg_head.lm_head.weight.copy_(remap(self.avg_head.lm_head.weight))
            self.avg_head.set_draft_vocab(new)
        log.info("draft vocabulary refreshed: %d of %d hot ids changed", changed, size)
        return True

    # ---- checkpoints ----------------------------------------------------------------------
    def checkpoint(self) -> None:
        if not finite_state(self.candidate_head.serving_state()):
            return
        state = {
            "steps": self.counters["train_steps"],
            "publishes": self.counters["publishes"],
            "version": self.counters["last_published_version"],
            "lr": self.lr,
            "config": asdict(self.cfg),
        }
        try:
            path = save_checkpoint(
                self.candidate_head, self.checkpoint_dir, self.counters["train_steps"], state, self.cfg.keep_checkpoints
            )
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


def run_trainer(
    spec: TrainerSpec | dict, stop_event: threading.Event | None = None, *, parent_pid: int | None = None
) -> dict:
    """Run until `stop_event` is set (or the parent process goes away). Returns the final counters
    plus the loss of every step."""
    spec = TrainerSpec.coerce(spec)
    torch.set_num_threads(spec.threads)
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
        spec = TrainerSpec.from_dict(read_handoff(args.spec))  # JSON, plus CUDA IPC handles beside it
        nice = spec.trainer_config.nice
        if nice:
            os.nice(nice)
        run_trainer(spec, stop, parent_pid=spec.parent_pid if spec.parent_pid is not None else parent)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
