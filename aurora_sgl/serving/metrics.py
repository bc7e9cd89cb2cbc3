"""Prometheus metrics and the windowed accept-length history behind /aurora/stats.

Per-request figures (TTFT, time per output token, accept length) are observed when a request
finishes, from that request's own counters -- never a server-lifetime average.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
ACCEPT_LEN_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0)
RATE_BUCKETS = tuple(i / 10 for i in range(11))


class Metrics:
    def __init__(self, num_spec_steps: int, window: int = 64):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("aurora_requests", "Finished requests", ["finish_reason"], registry=r)
        self.ttft = Histogram(
            "aurora_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "aurora_time_per_output_token_seconds",
            "Decode time per output token after the first",
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "aurora_e2e_request_latency_seconds", "Request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("aurora_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("aurora_generation_tokens", "Tokens generated", registry=r)
        self.accept_length = Histogram(
            "aurora_spec_accept_length", "Per-request accept length (tau)", buckets=ACCEPT_LEN_BUCKETS, registry=r
        )
        self.accept_rate = Histogram(
            "aurora_spec_accept_rate", "Per-request draft acceptance rate", buckets=RATE_BUCKETS, registry=r
        )
        self.accept_per_position = Gauge(
            "aurora_spec_accept_rate_per_position",
            "Acceptance rate at each draft position, over the last window of requests",
            ["position"],
            registry=r,
        )
        self.k_steps = Gauge(
            "aurora_spec_decode_steps_by_k",
            "Decode steps that drafted k tokens, since start (adaptive speculation; rate() gives the mix over time)",
            ["k"],
            registry=r,
        )
        self.rejected = Counter(
            "aurora_requests_rejected", "Requests refused with 503 by admission control", registry=r
        )
        self.running = Gauge("aurora_num_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("aurora_num_waiting_requests", "Requests queued for a slot", registry=r)
        self.step_seconds = Histogram(
            "aurora_engine_step_seconds", "Engine step time", buckets=LATENCY_BUCKETS, registry=r
        )
        self.draft_version = Gauge("aurora_draft_version", "Version of the draft weights being served", registry=r)
        self.train_steps = Gauge("aurora_trainer_steps", "Optimizer steps taken by the trainer", registry=r)
        self.train_loss = Gauge("aurora_trainer_loss", "Latest training loss", registry=r)
        self.trainer_alive = Gauge("aurora_trainer_alive", "1 while the trainer process runs", registry=r)
        self.trainer_restarts = Gauge(
            "aurora_trainer_restarts", "Times the supervisor restarted the trainer", registry=r
        )
        self.trainer_heartbeat_age = Gauge(
            "aurora_trainer_heartbeat_age_seconds", "Seconds since the trainer's last heartbeat", registry=r
        )
        self.trainer_last_step_age = Gauge(
            "aurora_trainer_last_step_age_seconds", "Seconds since the trainer's last optimizer step", registry=r
        )
        self.trainer_step_failures = Gauge(
            "aurora_trainer_step_failures", "Training steps that failed (their batch was dropped)", registry=r
        )
        self.trainer_positions_ratio = Gauge(
            "aurora_trainer_positions_per_recorded_position",
            "Positions trained (once per optimizer step that includes them) per position recorded: "
            "whether the trainer keeps up with the traffic",
            registry=r,
        )
        self.trainer_fresh_share = Gauge(
            "aurora_trainer_fresh_positions_per_recorded_position",
            "Positions the trainer has learned from at least once per position recorded: well below 1, "
            "recorded positions are lost on their way to training",
            registry=r,
        )
        self.trainer_publishes = Gauge("aurora_trainer_publishes", "Draft versions the trainer published", registry=r)
        self.trainer_refused = Gauge("aurora_trainer_refused", "Candidates the trainer's guardrail refused", registry=r)
        self.ring_drops = Gauge("aurora_ring_drops", "Records overwritten before the trainer read them", registry=r)
        self.draft_head_requests = Counter(
            "aurora_draft_head_requests",
            "Finished requests by the head that drafted them: live, or fallbackN (the start head kept frozen)",
            ["head"],
            registry=r,
        )
        self.swaps = Gauge("aurora_draft_swaps", "Draft weight swaps applied", registry=r)
        self.rollbacks = Gauge("aurora_draft_rollbacks", "Draft versions rolled back", registry=r)
        self.swap_pause = Gauge("aurora_last_swap_pause_seconds", "Pause of the last swap", registry=r)
        self.k = num_spec_steps
        self._lock = threading.Lock()
        self._window = collections.deque(maxlen=window)  # (version, tau, accepts per position, drafts per position)
        self._history: list[dict] = []  # windowed tau per draft version over time
        self._spec_tokens = 0.0  # tokens committed by verify steps, over the server's life
        self._spec_verifies = 0
        self._t0 = time.time()

    def request_finished(self, req, submitted_at: float, first_token_at: float | None, now: float) -> None:
        meta = req.meta_info()
        self.requests.labels(finish_reason=req.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(meta["prompt_tokens"])
        self.generation_tokens.inc(meta["completion_tokens"])
        self.e2e.observe(now - submitted_at)
        if first_token_at is not None:
            self.ttft.observe(first_token_at - submitted_at)
            if meta["completion_tokens"] > 1:
                self.tpot.observe((now - first_token_at) / (meta["completion_tokens"] - 1))
        if not req.verify_ct:
            return
        self.accept_length.observe(req.accept_length)
        with self._lock:
            self._spec_tokens += req.accept_length * req.verify_ct
            self._spec_verifies += req.verify_ct
        self.accept_rate.observe(meta["spec_accept_rate"])
        self.draft_head_requests.labels(head=meta["spec_draft_head"]).inc()
        if meta["spec_draft_head"] != "live":
            return  # the windows below describe the live version
        with self._lock:
            self._window.append(
                (
                    meta["draft_version"],
                    req.accept_length,
                    list(req.accepted_per_position),
                    list(req.drafted_per_position),
                )
            )
            for pos in range(self.k):
                drafted = sum(w[3][pos] for w in self._window)
                if drafted:
                    rate = sum(w[2][pos] for w in self._window) / drafted
                    self.accept_per_position.labels(position=str(pos + 1)).set(rate)
            version = meta["draft_version"]
            same = [w[1] for w in self._window if w[0] == version]
            self._history.append(
                {
                    "t": round(time.time() - self._t0, 3),
                    "draft_version": version,
                    "window_accept_length": round(sum(same) / len(same), 4),
                    "window_requests": len(same),
                }
            )
            del self._history[:-2000]

    def avg_spec_accept_length(self) -> float | None:
        """Tokens per verify step over every finished speculative request (SGLang's figure)."""
        with self._lock:
            return self._spec_tokens / self._spec_verifies if self._spec_verifies else None

    def stats(self) -> dict:
        with self._lock:
            return {"window_size": self._window.maxlen, "history": list(self._history)}

    def render(self) -> bytes:
        return generate_latest(self.registry)
