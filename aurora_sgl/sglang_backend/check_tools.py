"""What the SGLang device check (device_check.py) drives its servers with: command lines, a server
process with its log, HTTP, the plugin's exported counters, the trainer's status, GPU memory
through NVML (no CUDA context), prompts, and ring traffic scenarios.

Nothing here imports sglang or touches CUDA at import time; the pure helpers have CPU tests
(tests/test_sglang_device_check.py).
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

from .plugin import ENV_DIR, HANDOFF

READY_S = 420  # one server launch, weights to "ready" (a big target's first launch compiles kernels)
GRAPH_MAX_BS = 16  # --cuda-graph-max-bs-decode of the ring launches: captured 1..8, 10, 12, 14, 16


class CheckError(RuntimeError):
    """A check failed with a one-line reason (the row's detail)."""


# ---- command lines ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_argv(model_path: str, port: int, extra: list[str], *, online: bool = True) -> list[str]:
    """Our launcher as a user starts it (`launch_server --backend sglang`), day-0 head."""
    flag = "--online" if online else "--no-online"
    return [
        sys.executable,
        "-m",
        "aurora_sgl.launch_server",
        "--backend",
        "sglang",
        "--model-path",
        model_path,
        "--port",
        str(port),
        flag,
        *extra,
    ]


def plugin_sglang_args(model_path: str, draft_path: str, port: int, passthrough: list[str]) -> list[str]:
    """SGLang's command line for a server with our plugin and no trainer: what the launcher would
    build (`sglang_argv`: EAGLE3, 5 steps, topk 1 unless `passthrough` sets it, the target's dtype)."""
    from aurora_sgl.launch_server import build_parser, resolve_defaults

    from .launcher import sglang_argv

    ours = ["--backend", "sglang", "--model-path", model_path, "--port", str(port)]
    args, rest = build_parser().parse_known_args(ours + ["--speculative-draft-model-path", draft_path] + passthrough)
    resolve_defaults(args)
    return sglang_argv(args, rest, draft_path)


def plugin_server_argv(sglang_args: list[str]) -> list[str]:
    """SGLang's own server (`python -m sglang.launch_server`, which loads plugins), our plugin on."""
    return [sys.executable, "-m", "sglang.launch_server", *sglang_args]


def plugin_env(base: dict, handoff_dir: str) -> dict:
    """The environment the launcher gives SGLang's processes: the handoff dir switches the plugin
    on; a `SGLANG_PLUGINS` whitelist that leaves it out gets it added."""
    from .launcher import PLUGIN_NAME

    env = dict(base, **{ENV_DIR: handoff_dir})
    plugins = env.get("SGLANG_PLUGINS")
    if plugins and PLUGIN_NAME not in [p.strip() for p in plugins.split(",")]:
        env["SGLANG_PLUGINS"] = f"{plugins},{PLUGIN_NAME}"
    return env


def graph_batch_sizes(sglang_args: list[str]) -> tuple[list[int], int]:
    """(decode batch sizes SGLang captures CUDA graphs for, the largest), from its own parse and its
    own list generator (speculative: 1..8, then every second size up to 32, ...)."""
    from sglang.srt.arg_groups.cuda_graph_hook import generate_decode_cuda_graph_batch_sizes
    from sglang.srt.server_args import prepare_server_args

    sa = prepare_server_args(sglang_args)
    max_bs = sa.cuda_graph_max_bs_decode
    if max_bs is None:
        raise CheckError("the ring launches set --cuda-graph-max-bs-decode; it is missing")
    captured = sorted(sa.cuda_graph_bs_decode or generate_decode_cuda_graph_batch_sizes(sa, max_bs))
    return captured, max(captured)


def batch_plan(captured: list[int], max_bs: int) -> dict[str, int]:
    """Concurrent requests per batch scenario: 1; the smallest size SGLang pads to a larger graph
    (not captured itself, below the largest); more than the largest graph (eager verify)."""
    plan = {"batch 1": 1}
    padded = [b for b in range(2, max_bs) if b not in set(captured)]
    if padded:
        plan["padded graph batch"] = padded[0]
    plan["above graph max batch"] = max_bs + 3
    return plan


def visible_gpus(env_value: str | None, count: int) -> list[str]:
    """CUDA_VISIBLE_DEVICES entries of the visible GPUs (indices or UUIDs), in CUDA's order."""
    if env_value is None or not env_value.strip():
        return [str(i) for i in range(count)]
    return [e.strip() for e in env_value.split(",") if e.strip()][:count]


# ---- a server process -----------------------------------------------------------------------------
def last_line(path: str, prefer: tuple[str, ...] = ("Error", "error:", "Traceback")) -> str:
    """The last log line naming an error (else the last line), shortened: a row's reason."""
    try:
        with open(path, errors="replace") as f:
            lines = [ln.strip() for ln in f.readlines()[-400:] if ln.strip()]
    except OSError:
        return ""
    hits = [ln for ln in lines if any(p in ln for p in prefer) and not ln.startswith("Traceback")]
    line = (hits or lines or [""])[-1]
    return line if len(line) <= 240 else line[:237] + "..."


def http_json(url: str, payload: dict | None = None, timeout: float = 120) -> tuple[int, object]:
    data = json.dumps(payload).encode() if payload is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            body = r.read()
            return r.status, json.loads(body) if body else None
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:300]


class Server:
    """One server (our launcher, or SGLang's own with the plugin on) and its log file."""

    def __init__(self, name: str, argv: list[str], env: dict, log_dir: str, port: int, handoff_dir: str | None = None):
        self.name, self.port = name, port
        self.log_path = os.path.join(log_dir, f"{name}.log")
        self._log = open(self.log_path, "w")
        self.url = f"http://127.0.0.1:{port}"
        self.started = time.time()
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self._handoff_dir = handoff_dir

    def wait_ready(self, timeout: float = READY_S) -> float:
        """Seconds from start until `/health_generate` answers 200 (a one-token generation ran)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise CheckError(f"{self.name}: server exited ({self.proc.returncode}): {last_line(self.log_path)}")
            try:
                if http_json(self.url + "/health_generate", timeout=30)[0] == 200:
                    return time.time() - self.started
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise CheckError(f"{self.name}: not ready after {timeout:.0f} s: {last_line(self.log_path)}")
            time.sleep(2)

    def generate(self, payload: dict, timeout: float = 300) -> dict:
        status, body = http_json(self.url + "/generate", payload, timeout)
        if status != 200 or not isinstance(body, dict):
            raise CheckError(f"/generate answered {status}: {str(body)[:200]}")
        return body

    def generate_all(self, payloads: list[dict], concurrency: int, timeout: float = 300) -> list[dict]:
        with ThreadPoolExecutor(max(1, concurrency)) as pool:
            return list(pool.map(lambda p: self.generate(p, timeout), payloads))

    def handoff_dir(self, timeout: float = 60) -> str:
        """The plugin's handoff dir: ours for a plugin-only server, the launcher's temp dir else
        (`aurora_sgl_<launcher pid>_*`). Waits for `handoff.json` (written once SGLang's graphs are
        captured)."""
        deadline = time.monotonic() + timeout
        while True:
            d = self._handoff_dir
            if d is None:
                found = glob.glob(os.path.join(tempfile.gettempdir(), f"aurora_sgl_{self.proc.pid}_*"))
                d = found[0] if found else None
            if d is not None and os.path.exists(os.path.join(d, HANDOFF)):
                self._handoff_dir = d
                return d
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise CheckError(f"{self.name}: no {HANDOFF} from the plugin: {last_line(self.log_path)}")
            time.sleep(0.5)

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM to the server and everything it started, SIGKILL to what is left after `timeout`."""
        import psutil

        try:
            procs = [psutil.Process(self.proc.pid)]
            procs += procs[0].children(recursive=True)
        except psutil.NoSuchProcess:
            procs = []
        for p in procs:
            try:
                p.terminate()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        self.proc.poll()
        self._log.close()


def read_counters(handoff_dir: str, dp_rank: int = 0) -> dict[int, dict]:
    """One DP replica's counters per TP rank (counters_dp<D>_rank<T>.json, rewritten about once a
    second by the plugin)."""
    out = {}
    prefix = f"counters_dp{dp_rank}_rank"
    for f in glob.glob(os.path.join(handoff_dir, f"{prefix}*.json")):
        try:
            with open(f) as fh:
                out[int(os.path.basename(f)[len(prefix) : -len(".json")])] = json.load(fh)
        except (OSError, ValueError):
            pass
    return out


def wait_for(predicate, timeout: float, what: str, poll: float = 0.5):
    """predicate()'s first truthy value, or CheckError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise CheckError(f"{what} within {timeout:.0f} s")
        time.sleep(poll)


class TrainerWatch:
    """The launcher's trainer, from its spec beside the handoff: device, pid, status counters."""

    def __init__(self, handoff_dir: str, launcher_pid: int):
        self.dir, self.launcher_pid = handoff_dir, launcher_pid
        self._status = None
        self.spec: dict = {}

    def snapshot(self) -> dict:
        from aurora_sgl.transport.trainer_status import TrainerStatus

        path = os.path.join(self.dir, "trainer_spec.json")
        if self._status is None and os.path.exists(path):
            try:
                with open(path) as f:
                    self.spec = json.load(f)  # the plain part: device, status segment
                self._status = TrainerStatus.attach(self.spec["status"])
            except (OSError, ValueError, KeyError):
                return {}
        return self._status.snapshot() if self._status is not None else {}

    def pid(self) -> int | None:
        import psutil

        try:
            kids = psutil.Process(self.launcher_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        for p in kids:
            try:
                if "aurora_sgl.trainer" in " ".join(p.cmdline()):
                    return p.pid
            except psutil.Error:
                pass
        return None

    def close(self) -> None:
        if self._status is not None:
            self._status.close()
            self._status = None


def restarts_in_log(path: str) -> int:
    """Trainer restarts the launcher's supervisor logged."""
    try:
        with open(path, errors="replace") as f:
            return sum("trainer exited with" in line for line in f)
    except OSError:
        return 0


# ---- GPU memory (NVML: no CUDA context in this process) ---------------------------------------------
class GpuMemory:
    """Samples the used memory of some GPUs (CUDA_VISIBLE_DEVICES entries) every `period` seconds."""

    def __init__(self, entries: list[str], period: float = 0.2):
        import pynvml

        self._nvml = pynvml
        pynvml.nvmlInit()
        self.handles = [self._handle(e) for e in entries]
        self.samples: list[tuple[float, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _handle(self, entry: str):
        n = self._nvml
        return n.nvmlDeviceGetHandleByIndex(int(entry)) if entry.isdigit() else n.nvmlDeviceGetHandleByUUID(entry)

    def used(self) -> list[int]:
        return [self._nvml.nvmlDeviceGetMemoryInfo(h).used for h in self.handles]

    def total(self, i: int) -> int:
        return self._nvml.nvmlDeviceGetMemoryInfo(self.handles[i]).total

    def process_memory(self, i: int) -> dict[int, int]:
        """pid -> bytes on GPU i (empty where the container hides other pids)."""
        procs = self._nvml.nvmlDeviceGetComputeRunningProcesses(self.handles[i])
        return {p.pid: int(p.usedGpuMemory or 0) for p in procs}

    def start(self) -> GpuMemory:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), self.used()))
            except Exception:
                pass
            self._stop.wait(0.2)

    def peak(self, i: int, t0: float, t1: float) -> int | None:
        vals = [u[i] for t, u in self.samples if t0 <= t <= t1]
        return max(vals) if vals else None

    def before(self, i: int, t: float) -> int | None:
        vals = [u[i] for s, u in self.samples if s < t]
        return vals[-1] if vals else None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.1f} GiB"


# ---- prompts and traffic --------------------------------------------------------------------------------
def sample_texts() -> list[str]:
    """The reference model's held-out sample (code, math, Shakespeare, docs): English-ish text any
    tokenizer turns into real tokens."""
    from aurora_sgl import reference_model_path

    with open(os.path.join(reference_model_path(), "heldout_sample.jsonl")) as f:
        return [json.loads(line)["text"].replace("<|bos|>", "").replace("<|eos|>", "") for line in f]


class TokenSource:
    """Distinct token-id prompts for the ring scenarios, cut from the sample text with the target's
    own tokenizer (the recompute must see the exact ids SGLang served)."""

    def __init__(self, model_path: str):
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
        self.stream = [t for text in sample_texts() for t in tok(text, add_special_tokens=False)["input_ids"]]
        self.bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        self._at = 0

    def take(self, length: int, bos: bool = True) -> list[int]:
        """The next `length` tokens (after BOS when the tokenizer has one and `bos`); wraps around."""
        n = len(self.stream)
        out = [self.stream[(self._at + i) % n] for i in range(length)]
        self._at = (self._at + length + 7) % n
        return (self.bos if bos else []) + out


def text_prompts(n: int, chars: int = 600) -> list[str]:
    texts, out = sample_texts(), []
    for i in range(n):
        t = texts[i % len(texts)]
        start = (i * 97) % max(1, len(t) - chars)
        out.append(t[start : start + chars])
    return out


class Traffic:
    """Background closed-loop traffic (`concurrency` streams of text requests) until stopped:
    keeps the trainer fed until a swap shows up, or measures throughput."""

    def __init__(self, server: Server, concurrency: int, max_new_tokens: int, temperature: float = 0.0):
        self.server, self.concurrency, self.max_new = server, concurrency, max_new_tokens
        self.temperature = temperature
        self.prompts = text_prompts(64)
        self._stop = threading.Event()
        self.done: list[tuple[float, int, float]] = []  # (finish time, completion tokens, accept length)
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(concurrency)]

    def start(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def _loop(self, i: int) -> None:
        k = i
        while not self._stop.is_set():
            sp = {"max_new_tokens": self.max_new, "temperature": self.temperature, "ignore_eos": True}
            try:
                out = self.server.generate({"text": self.prompts[k % len(self.prompts)], "sampling_params": sp})
                meta = out.get("meta_info", {})
                self.done.append(
                    (time.time(), int(meta.get("completion_tokens", 0)), meta.get("spec_accept_length", 0))
                )
            except Exception as e:  # counted; the caller decides
                self.errors.append(str(e).splitlines()[0] if str(e) else type(e).__name__)
                if self._stop.wait(1.0):
                    return
            k += self.concurrency

    def stop(self, wait: float = 10.0) -> None:
        """Stop sending; requests in flight finish (or fail when the server stops) on their own."""
        self._stop.set()
        deadline = time.monotonic() + wait
        for t in self._threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))

    def window(self, t0: float, t1: float) -> tuple[int, int, float]:
        """(requests, completion tokens, mean accept length) of the requests finished in [t0, t1]."""
        got = [d for d in self.done if t0 <= d[0] <= t1]
        acc = [d[2] for d in got if d[2]]
        return len(got), sum(d[1] for d in got), (sum(acc) / len(acc) if acc else 0.0)


# ---- ring scenarios ---------------------------------------------------------------------------------
@dataclasses.dataclass
class Scenario:
    """One ring scenario's requests and what the ring got for them (records on the CPU)."""

    name: str
    sequences: dict  # rid -> prompt + output token ids
    starts: dict  # rid -> first position its rows must start at (cached prefix length)
    records: list
    counters: dict  # rank-0 counter deltas over the scenario
    max_batch: int | None = None  # the largest verify batch the capture has seen, after the scenario
    accept_length: float = 0.0

    def decode_steps(self) -> int:
        """Verify records of this scenario's requests (one per request and verify step)."""
        from .recompute import ring_id

        ids = {ring_id(r) for r in self.sequences}
        return sum(1 for r in self.records if r.request_id in ids and not bool((r.draft_tokens < 0).all()))


def greedy(max_new: int) -> dict:
    return {"max_new_tokens": max_new, "temperature": 0.0, "ignore_eos": True}


def rid(tag: str, i: int) -> str:
    """Request ids the ring keeps whole (<= 32 bytes) and the scenario recognises."""
    return f"dc{tag}{i:03d}{uuid.uuid4().hex[:8]}"


def drain_ring(reader, quiet_s: float = 1.5, timeout: float = 60) -> list:
    """Every record until the ring has been quiet for `quiet_s`, moved to the CPU."""
    got, last_written, quiet_since = [], None, time.monotonic()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = reader.read(1024)
        got += [cpu_record(r) for r in new]
        written = reader.stats()["written"]
        if new or written != last_written:
            last_written, quiet_since = written, time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return got
        time.sleep(0.05)
    return got


def cpu_record(rec):
    return dataclasses.replace(
        rec,
        **{f.name: getattr(rec, f.name).cpu() for f in dataclasses.fields(rec) if hasattr(getattr(rec, f.name), "cpu")},
    )


COUNTED = (
    "captured",
    "records_written",
    "prefill_captured",
    "staging_drops",
    "capture_skipped",
    "prefill_staging_drops",
    "prefill_rows_dropped",
    "prefill_skipped",
    "ring_drops",
)


def counter_delta(before: dict, after: dict) -> dict:
    return {k: after.get(k, 0) - before.get(k, 0) for k in COUNTED if k in after}


def run_scenario(server: Server, reader, name: str, payload_sets: list[list[dict]], concurrency: int) -> Scenario:
    """Send each set of requests (the sets one after the other, a set's requests concurrently),
    then read the ring until it is quiet and the plugin's counters after it."""
    handoff = server.handoff_dir()
    before = read_counters(handoff).get(0, {})
    outs = []
    for payloads in payload_sets:
        outs += server.generate_all(payloads, concurrency)
    records = drain_ring(reader)
    time.sleep(2.5)  # the counters are exported about once a second
    after = read_counters(handoff).get(0, {})
    sequences, starts, acc = {}, {}, []
    for p, o in zip([p for s in payload_sets for p in s], outs):
        sequences[p["rid"]] = list(p["input_ids"]) + list(o["output_ids"])
        starts[p["rid"]] = int(o["meta_info"].get("cached_tokens", 0))
        acc.append(float(o["meta_info"].get("spec_accept_length", 0.0)))
    delta = counter_delta(before, after)
    return Scenario(
        name, sequences, starts, records, delta, after.get("capture_max_batch"), sum(acc) / max(1, len(acc))
    )
