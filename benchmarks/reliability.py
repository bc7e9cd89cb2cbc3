"""Reliability of the real server under load, faults and hostile input.

    python benchmarks/reliability.py --out benchmarks/results/reliability.json --soak-minutes 20

Starts `python -m aurora_sgl.launch_server` (online training on, the reference model and its
offline head, a checkpoint directory) and drives it with mixed traffic: /v1/completions,
/v1/chat/completions and /generate, blocking and streamed, 80 % greedy and 20 % seeded sampling,
prompts from HumanEval, MT-Bench, GSM8K and Shakespeare. Every greedy answer is compared with
target-only decoding of the same prompt (a K = 0 engine in this process). Seeded sampling is
checked for completeness only: the engine promises the target's distribution, not the K = 0
engine's sample for a seed (which tokens the draft proposes changes how the seed's randomness
is consumed).

Scenarios, each one object in the output with at least `served`, `failed`, `differing_outputs`:
  soak                   traffic for --soak-minutes with the trainer training and swapping;
                         latency, resident memory over time, ring drops, swaps, rollbacks
  trainer_sigkill        SIGKILL the trainer under load; the supervisor restarts it
  trainer_sigstop        SIGSTOP the trainer for --sigstop-seconds, then SIGCONT
  corrupt_buffer         publish a weight-store version whose bytes do not match its checksum
  checkpoint_full        checkpoint directory on a full filesystem (64 KiB tmpfs)
  checkpoint_unwritable  checkpoint directory on a read-only filesystem
  client_aborts          half the clients hang up at a random point
  hostile_input          the hand-written hostile requests, repeatedly, next to normal traffic
  overload               4x more clients than running + queued slots: 503 + Retry-After
  server_sigterm         SIGTERM the server mid-stream, check shared memory is gone, restart
                         from the checkpoint directory and serve again
The mount-based checkpoint faults need root (mount); elsewhere they fall back to a checkpoint path
below a regular file (ENOTDIR) and say so in `mechanism`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common.paths import datasets_dir  # noqa: E402
from benchmarks.common.server import ServerProcess, owned_leftovers  # noqa: E402

DATASETS = datasets_dir()
NAME = "reference_model"
SAMPLED_SHARE = 0.2


# ---- the traffic mix and its target-only reference ----------------------------------------------
@dataclass
class Item:
    route: str  # "completions" | "chat" | "generate"
    stream: bool
    prompt: str  # for chat: the user message
    max_tokens: int
    stop: list[str] | None = None
    expected_text: str | None = None  # target-only greedy output
    expected_ids: list[int] | None = None


def _dataset_prompts(rng: random.Random, n: int) -> list[str]:
    out = []
    try:
        with gzip.open(DATASETS / "humaneval" / "HumanEval.jsonl.gz", "rt") as f:
            out += [json.loads(line)["prompt"][-400:] for line in f][:n]
        with open(DATASETS / "mt_bench" / "question.jsonl") as f:
            out += [json.loads(line)["turns"][0][:400] for line in f][:n]
        with open(DATASETS / "gsm8k" / "test.jsonl") as f:
            out += ["Question: " + json.loads(line)["question"][:400] + "\nAnswer:" for line in f][:n]
        text = (DATASETS / "shakespeare" / "input.txt").read_text()
        starts = [i for i in range(0, len(text) - 400, 997) if text[i - 2 : i] == "\n\n"] if len(text) > 1000 else []
        out += [text[i : i + 300] for i in starts[:n]]
    except OSError:  # no shared datasets here: the reference model's own held-out sample
        from aurora_sgl import reference_model_path

        rows = [json.loads(line) for line in open(Path(reference_model_path()) / "heldout_sample.jsonl")]
        out = [r["text"][:300] for r in rows]
    rng.shuffle(out)
    return out


def build_pool(size: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    prompts = _dataset_prompts(rng, size)
    routes = [
        ("completions", False),
        ("completions", True),
        ("chat", False),
        ("chat", True),
        ("generate", False),
        ("generate", True),
    ]
    pool = []
    for i in range(size):
        route, stream = routes[i % len(routes)]
        pool.append(
            Item(
                route,
                stream,
                prompts[i % len(prompts)],
                max_tokens=rng.choice([16, 32, 48]),
                stop=["\n\n"] if i % 5 == 4 and route != "generate" else None,
            )
        )
    return pool


def attach_references(pool: list[Item]) -> None:
    """Target-only greedy decoding (speculation off) of every pool prompt, as the server would
    build the prompt."""
    import torch

    from aurora_sgl.engine.engine import Engine
    from aurora_sgl.engine.sampling import SamplingParams

    torch.set_num_threads(1)
    engine = Engine(num_speculative_steps=0, max_running_requests=16)
    tok = engine.tokenizer
    texts = [
        tok.apply_chat_template([{"role": "user", "content": it.prompt}], tokenize=False, add_generation_prompt=True)
        if it.route == "chat"
        else it.prompt
        for it in pool
    ]
    params = [SamplingParams(max_new_tokens=it.max_tokens, stop=tuple(it.stop or ())) for it in pool]
    for it, out in zip(pool, engine.generate(texts, params)):
        it.expected_text, it.expected_ids = out["text"], out["output_ids"]


# ---- one request ----------------------------------------------------------------------------------
@dataclass
class Outcome:
    status: str  # "ok" | "failed" | "aborted"
    latency_s: float
    compared: bool = False
    differs: bool = False
    error: str | None = None
    http_status: int | None = None
    retry_after: str | None = None


def _body(it: Item, temperature: float, seed: int | None) -> tuple[str, dict]:
    if it.route == "generate":
        sp = {"max_new_tokens": it.max_tokens, "temperature": temperature}
        if seed is not None:
            sp["seed"] = seed
        return "/generate", {"text": it.prompt, "sampling_params": sp, "stream": it.stream}
    body = {"model": NAME, "max_tokens": it.max_tokens, "temperature": temperature, "stream": it.stream}
    if seed is not None:
        body["seed"] = seed
    if it.stop:
        body["stop"] = it.stop
    if it.route == "chat":
        return "/v1/chat/completions", dict(body, messages=[{"role": "user", "content": it.prompt}])
    return "/v1/completions", dict(body, prompt=it.prompt)


def _event_text(route: str, event: dict) -> str:
    if route == "chat":
        return "".join(c["delta"].get("content") or "" for c in event["choices"])
    return "".join(c.get("text") or "" for c in event["choices"])


async def _request(client: httpx.AsyncClient, url: str, it: Item, temperature: float, seed: int | None):
    """(text, output_ids or None) of a complete answer; raises on anything incomplete."""
    path, body = _body(it, temperature, seed)
    if not it.stream:
        r = await client.post(url + path, json=body)
        if r.status_code != 200:
            raise _HTTPStatus(r.status_code, r.text[:200], r.headers.get("retry-after"))
        data = r.json()
        if it.route == "generate":
            return data["text"], data["output_ids"]
        choice = data["choices"][0]
        return (choice["message"]["content"] if it.route == "chat" else choice["text"]), None
    text, ids, done = "", None, False
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            raise _HTTPStatus(
                r.status_code, (await r.aread())[:200].decode(errors="replace"), r.headers.get("retry-after")
            )
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"error event: {event['error']}")
            if it.route == "generate":
                text, ids = event["text"], event["output_ids"]
            else:
                text += _event_text(it.route, event)
    if not done:
        raise RuntimeError("stream ended without [DONE]")
    return text, ids


class _HTTPStatus(Exception):
    def __init__(self, status: int, body: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.retry_after = status, retry_after


async def one_request(client, url: str, it: Item, rng: random.Random, abort_after: float | None) -> Outcome:
    sampled = rng.random() < SAMPLED_SHARE
    temperature, seed = (0.8, rng.randrange(2**31)) if sampled else (0.0, None)
    t0 = time.perf_counter()
    try:
        coro = _request(client, url, it, temperature, seed)
        text, ids = await (asyncio.wait_for(coro, abort_after) if abort_after else coro)
    except TimeoutError:
        return Outcome("aborted", time.perf_counter() - t0)
    except Exception as e:  # noqa: BLE001 -- every failure is a figure, whatever its type
        return Outcome(
            "failed",
            time.perf_counter() - t0,
            error=f"{type(e).__name__}: {e}"[:300],
            http_status=getattr(e, "status", None),
            retry_after=getattr(e, "retry_after", None),
        )
    dt = time.perf_counter() - t0
    if sampled:
        return Outcome("ok", dt)
    differs = (ids != it.expected_ids) if ids is not None else (text != it.expected_text)
    return Outcome(
        "ok",
        dt,
        compared=True,
        differs=differs,
        error=f"differs: got {text[:80]!r}, want {it.expected_text[:80]!r}" if differs else None,
    )


# ---- load -----------------------------------------------------------------------------------------
def _pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))], 4)


def summarize(outcomes: list[Outcome]) -> dict:
    ok = [o for o in outcomes if o.status == "ok"]
    failed = [o for o in outcomes if o.status == "failed"]
    lat = [o.latency_s for o in ok]
    errors = [o.error for o in outcomes if o.error]
    return {
        "served": len(ok),
        "failed": len(failed),
        "differing_outputs": sum(o.differs for o in ok),
        "compared_with_target_only": sum(o.compared for o in ok),
        "aborted_by_client": sum(o.status == "aborted" for o in outcomes),
        "latency_p50_s": _pct(lat, 0.5),
        "latency_p99_s": _pct(lat, 0.99),
        "latency_mean_s": round(statistics.fmean(lat), 4) if lat else None,
        "first_errors": errors[:5],
    }


async def drive(
    url: str,
    pool: list[Item],
    concurrency: int,
    seconds: float,
    *,
    seed: int = 0,
    abort_share: float = 0.0,
    stop: asyncio.Event | None = None,
) -> list[Outcome]:
    """`concurrency` clients, each sending one request after another for `seconds` (or until
    `stop` is set: requests in flight then still finish)."""
    rng = random.Random(seed)
    outcomes: list[Outcome] = []
    end = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency + 4)

    async def client_loop(i: int, client):
        r = random.Random(rng.random())
        while time.monotonic() < end and not (stop and stop.is_set()):
            it = r.choice(pool)
            abort_after = r.uniform(0.05, 3.0) if r.random() < abort_share else None
            outcomes.append(await one_request(client, url, it, r, abort_after))

    async with httpx.AsyncClient(timeout=httpx.Timeout(300, connect=10), limits=limits) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(concurrency)))
    return outcomes


# ---- the server -----------------------------------------------------------------------------------
class Server(ServerProcess):
    """The real server with the reference head at K = 4, its log in the run's work directory."""

    def __init__(self, *args: str, log_dir: Path, tag: str, startup_timeout: float = 180, **kwargs):
        from aurora_sgl import reference_head_path

        head = ["--speculative-num-steps", "4", "--speculative-draft-model-path", reference_head_path()]
        super().__init__(
            *head, *args, log_path=log_dir / f"server_{tag}.log", startup_timeout=startup_timeout, **kwargs
        )

    def trainer(self) -> psutil.Process | None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.pid).children():
                if "aurora_sgl.trainer" in " ".join(child.cmdline()):
                    return child
        return None

    def rss_mb(self) -> dict:
        out = {}
        for name, p in (
            ("server", psutil.Process(self.pid) if self.proc.poll() is None else None),
            ("trainer", self.trainer()),
        ):
            with contextlib.suppress(psutil.Error):
                out[name] = round(p.memory_info().rss / 2**20, 1) if p else None
        return out

    def stats(self) -> dict:
        s = httpx.get(self.url + "/aurora/stats", timeout=30).json()
        fw, tr = s.get("flywheel") or {}, s.get("trainer") or {}
        info = httpx.get(self.url + "/server_info", timeout=30).json()
        return {
            "draft_version": s["draft_version"],
            "swaps": fw.get("swaps", 0),
            "rollbacks": fw.get("rollbacks", 0),
            "refused_versions": fw.get("refused", 0),
            "last_refused_version": fw.get("last_refused_version", 0),
            "ring_written": fw.get("ring_written", 0),
            "ring_drops": fw.get("ring_drops", 0),
            "trainer_alive": tr.get("alive"),
            "trainer_restarts": tr.get("restarts"),
            "train_steps": tr.get("train_steps"),
            "publishes": tr.get("publishes"),
            "checkpoint_failures": tr.get("checkpoint_failures"),
            "step_failures": tr.get("step_failures"),
            "in_flight": info["num_in_flight_requests"],
        }

    def wait_idle(self, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if httpx.get(self.url + "/server_info", timeout=30).json()["num_in_flight_requests"] == 0:
                return True
            time.sleep(0.2)
        return False

    def shm_segments(self) -> list[str]:
        return [f for f in os.listdir("/dev/shm") if f"_{self.pid}_" in f]

    def stop(self, sig=signal.SIGTERM, timeout: float = 90) -> int:
        return super().stop(sig, timeout)


def _delta(before: dict, after: dict, *keys: str) -> dict:
    return {k: (after.get(k) or 0) - (before.get(k) or 0) for k in keys}


async def _after(seconds: float) -> None:
    await asyncio.sleep(seconds)


async def _until(predicate, timeout: float, every: float = 0.25) -> float | None:
    """Seconds until predicate() held, or None on timeout (predicate runs in a thread)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if await asyncio.to_thread(predicate):
            return round(time.monotonic() - t0, 2)
        await asyncio.sleep(every)
    return None


# ---- scenarios --------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, pool: list[Item], work: Path):
        self.args, self.pool, self.work = args, pool, work
        self.ckpt = work / "ckpt"
        self.server: Server | None = None

    def start_main(self, tag: str = "main") -> Server:
        self.server = Server(
            "--checkpoint-dir",
            str(self.ckpt),
            "--trainer-config",
            self.args.trainer_config,
            "--max-running-requests",
            str(self.args.max_running),
            log_dir=self.work,
            tag=tag,
        )
        return self.server

    def load(self, seconds: float, *, fault=None, abort_share: float = 0.0, seed: int = 0, stop=None):
        """Traffic for `seconds` with `fault` (a coroutine) running alongside: (outcomes, fault's result)."""

        async def both():
            return await asyncio.gather(
                drive(
                    self.server.url,
                    self.pool,
                    self.args.concurrency,
                    seconds,
                    seed=seed,
                    abort_share=abort_share,
                    stop=stop,
                ),
                fault if fault is not None else _after(0),
            )

        return asyncio.run(both())

    # soak -------------------------------------------------------------------------------------------
    def soak(self) -> dict:
        s = self.server
        before, rss_start = s.stats(), s.rss_mb()
        samples = []
        seconds = self.args.soak_minutes * 60

        async def sample():
            t0 = time.monotonic()
            while time.monotonic() - t0 < seconds:
                await asyncio.sleep(min(30.0, seconds / 8))
                st = await asyncio.to_thread(s.stats)
                samples.append(
                    {
                        "t_s": round(time.monotonic() - t0),
                        "rss_mb": s.rss_mb(),
                        "draft_version": st["draft_version"],
                        "swaps": st["swaps"],
                        "ring_drops": st["ring_drops"],
                        "train_steps": st["train_steps"],
                    }
                )

        outcomes, _ = self.load(seconds, fault=sample(), seed=1)
        after, rss_end = s.stats(), s.rss_mb()
        trainer = s.trainer()  # the trainer takes no network input: it must hold no inet socket
        sockets = (
            len(getattr(trainer, "net_connections", getattr(trainer, "connections", lambda **_: []))(kind="inet"))
            if trainer
            else None
        )
        srv = [x["rss_mb"].get("server") or 0 for x in samples]
        return dict(
            summarize(outcomes),
            minutes=self.args.soak_minutes,
            concurrency=self.args.concurrency,
            requests_per_s=round(len(outcomes) / seconds, 3),
            rss_mb_start=rss_start,
            rss_mb_end=rss_end,
            rss_mb_server_max=max(srv) if srv else None,
            **_delta(
                before,
                after,
                "swaps",
                "rollbacks",
                "refused_versions",
                "ring_drops",
                "ring_written",
                "train_steps",
                "publishes",
                "trainer_restarts",
            ),
            draft_version_end=after["draft_version"],
            trainer_inet_sockets=sockets,
            samples=samples,
        )

    # trainer faults ----------------------------------------------------------------------------------
    def trainer_sigkill(self) -> dict:
        s, info = self.server, {}
        before = s.stats()

        async def fault():
            await asyncio.sleep(self.args.fault_seconds / 4)
            victim = s.trainer()
            info["killed_pid"] = victim.pid
            os.kill(victim.pid, signal.SIGKILL)
            info["restart_s"] = await _until(
                lambda: (t := s.trainer()) is not None and t.pid != victim.pid and s.stats()["trainer_alive"], 90
            )

        outcomes, _ = self.load(self.args.fault_seconds, fault=fault(), seed=2)
        after = s.stats()
        return dict(
            summarize(outcomes),
            **info,
            trainer_restarted=info.get("restart_s") is not None,
            **_delta(before, after, "trainer_restarts", "swaps", "rollbacks", "train_steps"),
            restarted_from=_restart_source(s.log_path),
        )

    def trainer_sigstop(self) -> dict:
        s, info = self.server, {}
        stop_s = self.args.sigstop_seconds

        async def fault():
            await asyncio.sleep(3)
            victim = s.trainer()
            os.kill(victim.pid, signal.SIGSTOP)
            # The counters from before the stop are read once it has landed: a step that was
            # finishing when the signal was sent is not a step taken while stopped.
            await _until(lambda: victim.status() == psutil.STATUS_STOPPED, 10, every=0.01)
            st0 = await asyncio.to_thread(s.stats)
            await asyncio.sleep(stop_s)
            st1 = await asyncio.to_thread(s.stats)
            os.kill(victim.pid, signal.SIGCONT)
            info.update(
                stopped_s=stop_s,
                train_steps_while_stopped=(st1["train_steps"] or 0) - (st0["train_steps"] or 0),
                ring_drops_while_stopped=st1["ring_drops"] - st0["ring_drops"],
                trainer_restarts_while_stopped=(st1["trainer_restarts"] or 0) - (st0["trainer_restarts"] or 0),
            )
            steps = st1["train_steps"] or 0
            info["trainer_trains_again_s"] = await _until(lambda: (s.stats()["train_steps"] or 0) > steps, 120)

        outcomes, _ = self.load(stop_s + self.args.fault_seconds / 2 + 3, fault=fault(), seed=3)
        # keep the load up until the trainer has shown it trains again
        return dict(summarize(outcomes), **info, trainer_alive=s.stats()["trainer_alive"])

    def corrupt_buffer(self) -> dict:
        """The trainer publishes a version whose bytes were flipped after its checksum was taken
        (its `corrupt@2` fault): the engine must refuse it and keep serving exact outputs."""
        fast = json.dumps({"inject": ["corrupt@2"], "tokens_per_step": 256, "publish_every": 1, "margin": 10.0})
        server = Server(
            "--trainer-config",
            fast,
            "--max-running-requests",
            str(self.args.max_running),
            log_dir=self.work,
            tag="corrupt",
        )
        main, self.server = self.server, server
        info, stop = {}, asyncio.Event()
        try:

            async def fault():
                # Traffic goes on until the trainer's second publish was refused (or 120 s): on a
                # loaded machine the trainer may need longer than `fault_seconds` to get there.
                info["refused_s"] = await _until(lambda: server.stats()["refused_versions"] > 0, 120)
                info["served_version_after"] = (await asyncio.to_thread(server.stats))["draft_version"]
                stop.set()

            outcomes, _ = self.load(max(self.args.fault_seconds, 120), fault=fault(), seed=4, stop=stop)
            after = server.stats()
            corrupted = after["last_refused_version"]
            return dict(
                summarize(outcomes),
                **info,
                corrupted_version=corrupted,
                corrupted_version_refused=info.get("refused_s") is not None
                and corrupted > 0
                and info.get("served_version_after") != corrupted,
                refused_versions=after["refused_versions"],
                swaps=after["swaps"],
                rollbacks=after["rollbacks"],
                trainer_alive=after["trainer_alive"],
            )
        finally:
            server.stop()
            self.server = main

    def checkpoint_fault(self, kind: str) -> dict:
        """A server whose checkpoint directory cannot take writes: full, or read-only."""
        target = self.work / f"ckpt_{kind}"
        target.mkdir()
        mechanism = _make_unwritable(target, kind)
        # Publish (and so try to checkpoint) often: every optimizer step, guardrail wide open.
        fast = json.dumps({"checkpoint_every": 1, "tokens_per_step": 256, "publish_every": 1, "margin": 10.0})
        server = Server(
            "--checkpoint-dir",
            str(target),
            "--trainer-config",
            fast,
            "--max-running-requests",
            str(self.args.max_running),
            log_dir=self.work,
            tag=kind,
        )
        main, self.server = self.server, server
        try:
            before = server.stats()
            info, stop = {}, asyncio.Event()

            async def fault():
                # Training goes on without checkpoints (the trainer needs a few publishes' worth of
                # traffic first); then a trainer crash restarts from the served weights.
                try:
                    info["first_checkpoint_failure_s"] = await _until(
                        lambda: (server.stats()["checkpoint_failures"] or 0) > 0, 240
                    )
                    await asyncio.sleep(self.args.fault_seconds / 4)
                    st = await asyncio.to_thread(server.stats)  # the restarted trainer counts from 0
                    info["checkpoint_failures"], info["publishes"] = st["checkpoint_failures"], st["publishes"]
                    victim = server.trainer()
                    os.kill(victim.pid, signal.SIGKILL)
                    info["restart_s"] = await _until(
                        lambda: (
                            (t := server.trainer()) is not None
                            and t.pid != victim.pid
                            and server.stats()["trainer_alive"]
                        ),
                        60,
                    )
                    await asyncio.sleep(self.args.fault_seconds / 4)
                finally:
                    stop.set()

            outcomes, _ = self.load(600, fault=fault(), seed=5, stop=stop)
            after = server.stats()
            files = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
        finally:
            server.stop()
            self.server = main
            _undo_unwritable(target, mechanism)
        return dict(
            summarize(outcomes),
            mechanism=mechanism,
            **info,
            trainer_alive_after=after["trainer_alive"],
            trainer_restarts=after["trainer_restarts"],
            files_left_in_checkpoint_dir=files,
            **_delta(before, after, "swaps", "train_steps"),
        )

    # client and input faults -------------------------------------------------------------------------
    def client_aborts(self) -> dict:
        s = self.server
        outcomes, _ = self.load(self.args.fault_seconds, abort_share=0.5, seed=6)
        t0 = time.monotonic()
        drained = s.wait_idle(60)
        probe = [it for it in self.pool if it.route == "generate" and not it.stream][0]

        async def probe_once():
            async with httpx.AsyncClient(timeout=120) as c:
                return await one_request(c, s.url, probe, random.Random(1), None)

        got = asyncio.run(probe_once())
        return dict(
            summarize(outcomes),
            slots_freed=drained,
            drain_s=round(time.monotonic() - t0, 2),
            probe_after_exact=got.status == "ok" and not got.differs,
        )

    def hostile_input(self) -> dict:
        """The hand-written hostile cases (tests/test_hostile_input.py), sent again and again next
        to normal traffic: every one must get its 4xx JSON error, and the traffic must not notice."""
        sys.path.insert(0, str(REPO / "tests"))
        from test_hostile_input import HAND_CASES, _chunked

        async def achunked():  # an async client needs an async body
            for piece in _chunked(16 << 20):
                yield piece

        s, res = self.server, {"sent": 0, "as_expected": 0, "bad": [], "max_latency_s": 0.0}

        async def barrage():
            async with httpx.AsyncClient(timeout=60) as c:
                t_end = time.monotonic() + self.args.fault_seconds
                while time.monotonic() < t_end:
                    for name, path, body, status in HAND_CASES:
                        content = achunked() if body == "chunked" else body
                        t0 = time.perf_counter()
                        try:
                            r = await c.post(
                                s.url + path, content=content, headers={"Content-Type": "application/json"}
                            )
                            ok = r.status_code == status and set(r.json()["error"]) == {"message", "type", "code"}
                        except Exception as e:  # noqa: BLE001
                            ok, r = False, e
                        dt = round(time.perf_counter() - t0, 3)
                        if dt > res["max_latency_s"]:
                            res["max_latency_s"], res["slowest_case"] = dt, name
                        res["sent"] += 1
                        res["as_expected"] += ok
                        if not ok:
                            res["bad"].append(f"{name}: {getattr(r, 'status_code', r)}")
                        await asyncio.sleep(0)

        outcomes, _ = self.load(self.args.fault_seconds, fault=barrage(), seed=8)
        healthy = httpx.get(s.url + "/health", timeout=10).status_code == 200
        return dict(
            summarize(outcomes),
            hostile_cases=len(HAND_CASES),
            hostile_requests_sent=res["sent"],
            hostile_answered_as_expected=res["as_expected"],
            hostile_bad=res["bad"][:10],
            hostile_max_latency_s=res["max_latency_s"],
            hostile_slowest_case=res.get("slowest_case"),
            healthy_after=healthy,
        )

    def overload(self) -> dict:
        """Running 4 + queued 4 slots, 32 clients: the excess gets 503 + Retry-After at once."""
        server = Server(
            "--no-online",
            "--max-running-requests",
            "4",
            "--max-queued-requests",
            "4",
            log_dir=self.work,
            tag="overload",
        )
        main, self.server = self.server, server
        peak, rss = [0], []
        try:
            rss.append(server.rss_mb()["server"])

            async def watch():
                t_end = time.monotonic() + self.args.fault_seconds
                async with httpx.AsyncClient(timeout=30) as c:
                    while time.monotonic() < t_end:
                        info = (await c.get(server.url + "/server_info")).json()
                        peak[0] = max(peak[0], info["num_in_flight_requests"])
                        await asyncio.sleep(0.05)

            saved = self.args.concurrency
            self.args.concurrency = 32
            try:
                outcomes, _ = self.load(self.args.fault_seconds, fault=watch(), seed=9)
            finally:
                self.args.concurrency = saved
            rss.append(server.rss_mb()["server"])
            retry_after = httpx.post(server.url + "/v1/completions", json={"prompt": "x", "max_tokens": 1}).status_code
        finally:
            server.stop()
            self.server = main
        rejected = [o for o in outcomes if o.status == "failed" and o.http_status == 503]
        summary = summarize([o for o in outcomes if o not in rejected])
        return dict(
            summary,
            rejected_503=len(rejected),
            rejected_with_retry_after=sum(o.retry_after is not None for o in rejected),
            capacity=8,
            clients=32,
            peak_in_flight=peak[0],
            rss_mb_start=rss[0],
            rss_mb_end=rss[1],
            served_after=retry_after == 200,
        )

    # server SIGTERM and restart ----------------------------------------------------------------------
    def short_flood(self) -> dict:
        """Issue 18: a client sending 1-token prompts with 2 new tokens, one after another, next to
        the normal load. Sequences shorter than the TTT unroll used to kill the trainer at every
        step until the supervisor gave up; now training goes on."""
        s = self.server
        before = s.stats()
        sent = {"n": 0, "bad": 0}

        async def fault():
            body = {"input_ids": [5], "sampling_params": {"max_new_tokens": 2, "temperature": 0}}
            t_end = time.monotonic() + self.args.fault_seconds
            async with httpx.AsyncClient(timeout=60) as c:
                while time.monotonic() < t_end:
                    r = await c.post(s.url + "/generate", json=body)
                    sent["n"] += 1
                    sent["bad"] += r.status_code != 200

        outcomes, _ = self.load(self.args.fault_seconds, fault=fault(), seed=11)
        time.sleep(5)  # a crash at the last step would show as a restart within the supervisor's poll
        after = s.stats()
        return dict(
            summarize(outcomes),
            short_requests=sent["n"],
            short_requests_failed=sent["bad"],
            **_delta(before, after, "trainer_restarts", "train_steps", "step_failures"),
            trainer_alive=after["trainer_alive"],
        )

    def large_prompt(self) -> dict:
        """Issue 18: chat requests of 7 M characters (under the body limit) next to the load; /health
        is polled throughout. Tokenizing them on the event loop froze the server for ~10 s."""
        s, res = self.server, {"codes": [], "health_s": []}

        async def fault():
            body = {"messages": [{"role": "user", "content": "x" * 7_000_000}], "max_tokens": 4}
            done = asyncio.Event()

            async def poll_health():
                async with httpx.AsyncClient(timeout=60) as c:
                    while not done.is_set():
                        t0 = time.monotonic()
                        await c.get(s.url + "/health")
                        res["health_s"].append(time.monotonic() - t0)
                        await asyncio.sleep(0.05)

            async def big():
                async with httpx.AsyncClient(timeout=120) as c:
                    for _ in range(3):
                        r = await c.post(s.url + "/v1/chat/completions", json=body)
                        res["codes"].append(r.status_code)
                done.set()

            await asyncio.gather(poll_health(), big())

        outcomes, _ = self.load(self.args.fault_seconds / 2, fault=fault(), seed=12)
        lat = sorted(res["health_s"])
        return dict(
            summarize(outcomes),
            large_prompt_status=res["codes"],
            health_polls=len(lat),
            health_latency_max_s=round(lat[-1], 3) if lat else None,
            health_latency_p50_s=_pct(lat, 0.5),
        )

    def pgroup_sigkill(self) -> dict:
        """Issue 18: SIGKILL of a second online server's whole process group (server and trainer),
        then a new server: what the killed one left in /dev/shm and the temp dir is swept at startup.
        The load runs against the main server, which must not notice."""
        info = {}

        async def fault():
            victim = await asyncio.to_thread(
                Server, "--max-running-requests", "4", log_dir=self.work, tag="pgkill_victim", start_new_session=True
            )
            await asyncio.sleep(3)
            pid = victim.pid
            os.killpg(pid, signal.SIGKILL)
            await asyncio.to_thread(victim.stop)
            left = owned_leftovers(pid)
            info["left_after_sigkill"] = len(left)
            successor = await asyncio.to_thread(
                Server, "--max-running-requests", "4", log_dir=self.work, tag="pgkill_successor"
            )
            try:
                info["left_after_restart"] = len([p for p in left if os.path.exists(p)])
                async with httpx.AsyncClient(timeout=30) as c:
                    info["successor_healthy"] = (await c.get(successor.url + "/health")).status_code == 200
            finally:
                await asyncio.to_thread(successor.stop)
            info["successor_left_after_sigterm"] = len(owned_leftovers(successor.pid))

        outcomes, _ = self.load(self.args.fault_seconds / 2, fault=fault(), seed=13)
        return dict(summarize(outcomes), **info)

    def server_sigterm(self) -> dict:
        s = self.server
        trainer = s.trainer()
        spec_dir = Path(trainer.cmdline()[trainer.cmdline().index("--spec") + 1]).parent if trainer else None
        stop, info = asyncio.Event(), {}

        async def fault():
            # The restart below must have a checkpoint to resume from.
            info["waited_for_a_checkpoint_s"] = await _until(lambda: _newest_checkpoint(self.ckpt) is not None, 300)
            await asyncio.sleep(4)  # clients are mid-stream by now
            stop.set()  # the load stops starting new requests; those in flight must finish
            s.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            try:  # a request after SIGTERM: refused cleanly (connection refused), never half-served
                async with httpx.AsyncClient(timeout=30) as c:
                    r = await c.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 4})
                info["request_after_sigterm"] = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                info["request_after_sigterm"] = type(e).__name__

        outcomes, _ = self.load(600, fault=fault(), seed=10, stop=stop)
        rc = s.proc.wait(timeout=90)
        s.stop()  # already exited: closes its log
        leftover = s.shm_segments()
        trainer_gone = _gone(trainer)
        newest = _newest_checkpoint(self.ckpt)
        during = summarize(outcomes)
        # restart on the same checkpoint directory
        restarted = self.start_main(tag="restart")
        resolved = httpx.get(restarted.url + "/server_info").json().get("resolved_draft_path")
        after, _ = self.load(self.args.fault_seconds / 2, seed=11)
        after_sum = summarize(after)
        return {
            "served": during["served"] + after_sum["served"],
            "failed": during["failed"] + after_sum["failed"],
            "differing_outputs": during["differing_outputs"] + after_sum["differing_outputs"],
            "load_until_sigterm": during,
            **info,
            "exit_status": rc,
            "shm_segments_left": leftover,
            "trainer_stopped": trainer_gone,
            "trainer_spec_dir_left": spec_dir is not None and spec_dir.exists(),
            "newest_checkpoint_before": newest and Path(newest).name,
            "restart_resumed_from": resolved and Path(resolved).name,
            "restart_resumed_from_newest_checkpoint": bool(newest) and resolved == newest,
            "after_restart": after_sum,
        }


def _gone(p: psutil.Process | None, timeout: float = 15) -> bool:
    """True once `p` has exited (within `timeout`)."""
    if p is None:
        return True
    try:
        p.wait(timeout)
        return True
    except psutil.NoSuchProcess:
        return True
    except psutil.TimeoutExpired:
        return False


def _restart_source(log_path: Path) -> str | None:
    """What the supervisor's last restart resumed from, as it logged it."""
    lines = [line for line in log_path.read_text().splitlines() if "; restart " in line]
    return lines[-1].split(" from ", 1)[-1].strip() if lines else None


def _newest_checkpoint(root: Path) -> str | None:
    from aurora_sgl.trainer.checkpoints import newest_checkpoint

    return newest_checkpoint(str(root))


def tmpfs_available() -> bool:
    """Whether a small tmpfs can be mounted here (root and a working mount): the only way to give
    the trainer a really full or read-only checkpoint filesystem."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    probe = Path(tempfile.mkdtemp(prefix="aurora_tmpfs_probe_"))
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
        if ok.returncode != 0:
            return False
        subprocess.run(["umount", str(probe)], capture_output=True)
        return True
    finally:
        shutil.rmtree(probe, ignore_errors=True)


def _make_unwritable(target: Path, kind: str) -> str:
    opts = "size=64k" if kind == "checkpoint_full" else "ro,size=1m"
    if (
        os.geteuid() == 0
        and subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(target)], capture_output=True).returncode
        == 0
    ):
        return f"tmpfs -o {opts}"
    if kind == "checkpoint_unwritable" and os.geteuid() != 0:
        os.chmod(target, 0o500)
        return "chmod 0500"
    target.rmdir()
    target.write_text("a regular file where the checkpoint directory should be")
    return "regular file in the way (ENOTDIR)"


def _undo_unwritable(target: Path, mechanism: str) -> None:
    if mechanism.startswith("tmpfs"):
        subprocess.run(["umount", str(target)], capture_output=True)
    elif mechanism.startswith("chmod"):
        os.chmod(target, 0o700)


SCENARIOS = (
    "soak",
    "trainer_sigkill",
    "trainer_sigstop",
    "corrupt_buffer",
    "checkpoint_full",
    "checkpoint_unwritable",
    "client_aborts",
    "hostile_input",
    "overload",
    "server_sigterm",
    "short_flood",
    "large_prompt",
    "pgroup_sigkill",
)


def _meta(args, pool_size: int, work: Path) -> dict:
    return {
        "concurrency": args.concurrency,
        "max_running_requests": args.max_running,
        "soak_minutes": args.soak_minutes,
        "fault_seconds": args.fault_seconds,
        "sigstop_seconds": args.sigstop_seconds,
        "pool_prompts": pool_size,
        "sampled_share": SAMPLED_SHARE,
        "cpu_count": os.cpu_count(),
        "server_threads": 1,
        "trainer_threads": 1,
        "model": NAME,
        "speculative_num_steps": 4,
        "trainer_config": json.loads(args.trainer_config),
        "logs": str(work) if args.keep_logs else None,
    }


def _save(args, results: dict) -> None:
    """Write after every scenario (a later crash keeps the earlier figures); with --merge, keep
    the file's other scenarios."""
    if not args.out:
        return
    old = json.loads(args.out.read_text()) if args.merge and args.out.exists() else {}
    scenarios = dict(old.get("scenarios", {}), **results["scenarios"])
    meta = (
        results["meta"]
        if not old
        else dict(old.get("meta", {}), **{f"rerun_{k}": results["meta"] for k in results["scenarios"]})
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"meta": meta, "scenarios": {k: scenarios[k] for k in SCENARIOS if k in scenarios}}, indent=2) + "\n"
    )


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="aurora_reliability_"))
    pool = build_pool(args.pool_size, seed=0)
    t0 = time.monotonic()
    attach_references(pool)
    print(f"target-only references for {len(pool)} prompts in {time.monotonic() - t0:.1f} s", flush=True)
    bench = Bench(args, pool, work)
    wanted = [s for s in SCENARIOS if s in args.scenarios]
    results = {}
    bench.start_main()
    try:
        # Warm the server up (first requests allocate) before the soak's start figures.
        asyncio.run(drive(bench.server.url, pool, args.concurrency, 5, seed=99))
        for name in wanted:
            t0 = time.monotonic()
            if name in ("checkpoint_full", "checkpoint_unwritable"):
                results[name] = bench.checkpoint_fault(name)
            else:
                results[name] = getattr(bench, name)()
            results[name]["wall_s"] = round(time.monotonic() - t0, 1)
            r = results[name]
            print(
                f"{name}: served {r['served']} failed {r['failed']} differing {r['differing_outputs']} "
                f"({r['wall_s']} s)",
                flush=True,
            )
            _save(args, {"meta": _meta(args, len(pool), work), "scenarios": results})
    finally:
        if bench.server is not None and bench.server.proc.poll() is None:
            bench.server.stop()
        if not args.keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    return {"meta": _meta(args, len(pool), work), "scenarios": results}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--soak-minutes", type=float, default=20.0)
    ap.add_argument("--fault-seconds", type=float, default=60.0, help="load time around each fault")
    ap.add_argument("--sigstop-seconds", type=float, default=30.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-running", type=int, default=16)
    ap.add_argument(
        "--trainer-config", default='{"checkpoint_every": 1}', help="--trainer-config of the main server (JSON)"
    )
    ap.add_argument("--pool-size", type=int, default=48)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--merge", action="store_true", help="keep the other scenarios already in --out")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(args.scenarios) - set(SCENARIOS))
    if unknown:
        print(f"error: unknown scenarios {unknown}; choose from {', '.join(SCENARIOS)}", file=sys.stderr)
        return 2
    results = run(args)
    worst = {k: (v["failed"], v["differing_outputs"]) for k, v in results["scenarios"].items()}
    print(json.dumps(worst))
    return 0


if __name__ == "__main__":
    sys.exit(main())
