"""The SGLang backend's GPU check: `launch/device_check.sh --sglang [--model-path M] [SGLang flags]`.

What a user with GPUs runs first. Each check below is a group of table rows run in a process of
its own, under its own time limit; a group that fails, crashes or runs out of time gets FAIL rows
(with the reason and its log) and the next group runs. One table at the end, and the time taken.

  default      our launcher as a user starts it on one GPU, day-0 head: time to ready; GPU memory
               before and while the trainer (on the same GPU) starts; the first swap the trainer
               causes, with `swapper.hot` the worker's `hot_token_id` tensor and the live draft
               equal to the store's version (the plugin's exported `swap_facts`)
  ring_topk1   SGLang with the plugin and no trainer (so this process reads the ring): ring rows
               against an eager float32 recompute of the target (recompute.py) at batch 1, at a
               padded CUDA-graph batch, above the graph's largest batch, with chunked prefill and
               with a radix-cache hit; then, acting as the trainer, a published head with its draft
               vocabulary permuted (d2t and lm_head rows alike) must reach SGLang's parameters and
               hot map, and draft as before
  ring_topk4   the ring rows again with `--speculative-eagle-topk 4 --speculative-num-draft-tokens 8`
  no_overlap   `--disable-overlap-schedule`: ring rows (padded batch, chunked prefill) and the swap
  two_gpus     two GPUs: the trainer on the second, to the first swap            (>= 2 GPUs)
  tp2          `--tp-size 2` to the first swap on both ranks, one hot map         (>= 2 GPUs)
  throughput   concurrency 48, `--no-online` then `--online`: tokens/s and their ratio

Logs, the table as JSON and each group's rows go to --log-dir (printed at the end).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

from . import check_tools as ct
from .launcher import preflight
from .swap_facts import differences

PASS, FAIL, SKIP = "PASS", "FAIL", "skipped"
RING_LABELS = ("batch 1", "padded graph batch", "above graph max batch", "chunked prefill", "radix hit")
THIS = "aurora_sgl.sglang_backend.device_check"


@dataclass(frozen=True)
class Group:
    name: str
    target: str  # "module:function" run in a child process as fn(ctx, report)
    limit_s: int
    rows: tuple[str, ...]
    min_gpus: int = 1


def _ring_rows(prefix: str, labels=RING_LABELS) -> tuple[str, ...]:
    return tuple(f"{prefix}{label}" for label in labels)


D2T_ROW = "published permuted d2t reaches SGLang (topk 1)"
NO_OVERLAP = "--disable-overlap-schedule: "
GROUPS = (
    Group(
        "default",
        f"{THIS}:group_default",
        720,
        (
            "default launch ready (1 GPU, day-0 head)",
            "peak GPU memory while the trainer starts",
            "first swap: swapper.hot is the worker's tensor",
        ),
    ),
    Group("ring_topk1", f"{THIS}:group_ring_topk1", 720, _ring_rows("ring = eager, topk 1, ") + (D2T_ROW,)),
    Group("ring_topk4", f"{THIS}:group_ring_topk4", 600, _ring_rows("ring = eager, topk 4, ")),
    Group(
        "no_overlap",
        f"{THIS}:group_no_overlap",
        600,
        _ring_rows(NO_OVERLAP + "ring = eager, ", ("padded graph batch", "chunked prefill"))
        + (NO_OVERLAP + "published permuted d2t reaches SGLang",),
    ),
    Group("two_gpus", f"{THIS}:group_two_gpus", 600, ("2 GPUs: trainer on the second",), min_gpus=2),
    Group("tp2", f"{THIS}:group_tp2", 720, ("TP=2 to the first swap",), min_gpus=2),
    Group("throughput", f"{THIS}:group_throughput", 1200, ("throughput at concurrency 48, online vs offline",)),
)
# Every group at its limit, plus starting processes and waiting for GPU memory between groups:
# launch/device_check.sh --sglang gives the whole run this long (its `timeout`).
BUDGET_S = sum(g.limit_s for g in GROUPS) + 240


# ---- reporting (child side) ---------------------------------------------------------------------------
class Report:
    """A group's rows, its current stage and its end, as JSON lines the parent reads."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, obj: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(obj) + "\n")

    def row(self, name: str, result: str, detail: str) -> None:
        self._write({"row": [name, result, detail]})

    def stage(self, text: str) -> None:
        self._write({"stage": text})

    def error(self, text: str) -> None:
        self._write({"error": text})

    def done(self) -> None:
        self._write({"done": True})


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text and not isinstance(e, ct.CheckError) else (text or [""])[0]


def attempt(out: Report, name: str, fn) -> None:
    """One row: fn() -> (result, detail); an exception is that row's FAIL and the group goes on."""
    out.stage(name)
    try:
        result, detail = fn()
    except Exception as e:
        traceback.print_exc()
        result, detail = FAIL, one_line(e)
    out.row(name, result, detail)


# ---- reading the report (parent side) ------------------------------------------------------------
def read_report(path: str) -> dict:
    out = {"rows": [], "stage": None, "error": None, "done": False}
    try:
        with open(path) as f:
            lines = f.readlines()
    except OSError:
        return out
    for line in lines:
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if "row" in obj:
            out["rows"].append(tuple(obj["row"]))
        out["stage"] = obj.get("stage", out["stage"])
        out["error"] = obj.get("error", out["error"])
        out["done"] = out["done"] or bool(obj.get("done"))
    return out


def complete_rows(group: Group, report: dict, *, timed_out: bool, limit: float, returncode, log_path: str) -> list:
    """The group's rows: what it reported, and a FAIL with the reason for each expected row it did
    not report (it timed out, raised, or crashed)."""
    rows = list(report["rows"])
    have = {r[0] for r in rows}
    if timed_out:
        why = f"timed out after {limit:.0f} s (at: {report['stage'] or 'start'}); log {log_path}"
    elif report["error"]:
        why = f"{report['error']} (at: {report['stage'] or 'start'}); log {log_path}"
    elif not report["done"]:
        why = f"the check process exited with code {returncode}: {ct.last_line(log_path)}; log {log_path}"
    else:
        why = f"not reported; log {log_path}"
    return rows + [(name, FAIL, why) for name in group.rows if name not in have]


# ---- running a group in its own process ------------------------------------------------------------
def kill_group(pgid: int, grace: float = 20.0) -> None:
    """SIGTERM to the group's process group (the check process and every server it started), then
    SIGKILL to whatever is still running after `grace` seconds."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not group_running(pgid):
                return
            time.sleep(0.2)


def group_running(pgid: int) -> bool:
    """Whether a process of the group still runs (zombies, dead but not yet reaped, do not count)."""
    import psutil

    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return False


def run_group(group: Group, context_path: str, log_dir: str, limit: float) -> list:
    rows_path = os.path.join(log_dir, f"{group.name}.rows.jsonl")
    log_path = os.path.join(log_dir, f"{group.name}.log")
    open(rows_path, "w").close()  # a rerun into the same --log-dir starts from no rows
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", THIS, "--group", group.target, "--context", context_path, "--rows", rows_path],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: a timeout ends everything it started
        )
        timed_out = False
        try:
            proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:  # also on an interrupt, and what a finished group left running
            kill_group(proc.pid)
            proc.wait()
    report = read_report(rows_path)
    return complete_rows(group, report, timed_out=timed_out, limit=limit, returncode=proc.returncode, log_path=log_path)


def wait_gpus_released(entries: list[str], baseline: list[int] | None, timeout: float = 60) -> None:
    """After a group: wait until the GPUs' used memory is back near what it was before the run."""
    if not baseline:
        return
    try:
        mem = ct.GpuMemory(entries)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(u <= b + (1 << 30) for u, b in zip(mem.used(), baseline)):
                return
            time.sleep(1)
    except Exception:
        return


def run_groups(groups, ctx: dict, gpus: int, budget_s: float, progress=None) -> list:
    """Every group in turn: skipped rows where too few GPUs are visible, FAIL rows where the time
    budget is spent, the group's own rows otherwise."""
    os.makedirs(ctx["log_dir"], exist_ok=True)
    context_path = os.path.join(ctx["log_dir"], "context.json")
    with open(context_path, "w") as f:
        json.dump(ctx, f)
    baseline = None
    try:
        baseline = ct.GpuMemory(ctx["gpus"]).used() if ctx["gpus"] else None
    except Exception:
        pass
    deadline = time.monotonic() + budget_s
    rows = []
    for i, g in enumerate(groups):
        left = deadline - time.monotonic()
        if gpus < g.min_gpus:
            rows += [(name, SKIP, f"needs {g.min_gpus} GPUs, {gpus} visible") for name in g.rows]
            continue
        if left < 60:
            rows += [(name, FAIL, "not run: the time budget is spent") for name in g.rows]
            continue
        limit = min(g.limit_s, left)
        if progress:
            progress(f"{g.name}: running (limit {limit:.0f} s)")
        t0 = time.monotonic()
        try:
            got = run_group(g, context_path, ctx["log_dir"], limit)
        except KeyboardInterrupt:  # Ctrl-C or the script's own timeout (SIGTERM): the table so far
            for rest in groups[i:]:
                rows += [(name, FAIL, "interrupted") for name in rest.rows]
            return rows
        if progress:
            fails = sum(r[1] == FAIL for r in got)
            progress(f"{g.name}: {len(got)} rows, {fails} FAIL, {time.monotonic() - t0:.0f} s")
        rows += got
        wait_gpus_released(ctx["gpus"], baseline)
    return rows


def format_table(rows) -> str:
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'check'.ljust(w0)}  {'result'.ljust(w1)}  detail"]
    lines += [f"{n.ljust(w0)}  {res.ljust(w1)}  {d}" for n, res, d in rows]
    return "\n".join(lines)


def took(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"took {m} min {s} s" if m else f"took {s} s"


# ---- the checks (child side) ----------------------------------------------------------------------
def _visible(ctx: dict, n: int) -> dict:
    return dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(ctx["gpus"][:n]))


def _launch(ctx: dict, name: str, n_gpus: int, extra=(), online: bool = True) -> ct.Server:
    port = ct.free_port()
    argv = ct.launcher_argv(ctx["model_path"], port, list(ctx["extra"]) + list(extra), online=online)
    return ct.Server(name, argv, _visible(ctx, n_gpus), ctx["log_dir"], port)


def _model_desc(model_path: str) -> str:
    try:
        from .launcher import target_dtype

        return f"{os.path.basename(os.path.normpath(model_path))} ({target_dtype(model_path)})"
    except Exception:
        return os.path.basename(os.path.normpath(model_path))


def _wait_first_swap(handoff: str, ranks=(0,), timeout: float = 300) -> dict:
    def swapped():
        c = ct.read_counters(handoff)
        return c if all(c.get(r, {}).get("swaps", 0) >= 1 for r in ranks) else None

    return ct.wait_for(swapped, timeout, "no swap (did the trainer publish? see the server log)")


def group_default(ctx: dict, out: Report) -> None:
    rows = GROUPS[0].rows
    mem = ct.GpuMemory(ctx["gpus"][:1]).start()
    out.stage("launching")
    server = _launch(ctx, "default_server", 1)
    trainer = traffic = None
    try:
        ready = server.wait_ready()
        out.row(rows[0], PASS, f"ready in {ready:.0f} s: {_model_desc(ctx['model_path'])}, day-0 head, 1 GPU")
        handoff = server.handoff_dir()
        t_handoff = os.path.getmtime(os.path.join(handoff, "handoff.json"))  # the trainer starts now
        trainer = ct.TrainerWatch(handoff, server.proc.pid)
        traffic = ct.Traffic(server, 16, 128).start()
        t_traffic = time.time()
        attempt(out, rows[1], lambda: _trainer_start_memory(server, mem, trainer, t_handoff))
        attempt(out, rows[2], lambda: _first_swap_facts(server, handoff, trainer, traffic, t_traffic))
    finally:
        if traffic is not None:
            traffic.stop()
        if trainer is not None:
            trainer.close()
        server.stop()
        mem.stop()


def _trainer_start_memory(server, mem, trainer, t_handoff: float):
    ct.wait_for(lambda: trainer.snapshot().get("train_steps", 0) >= 1, 300, "the trainer made no training step")
    first_step = time.time()
    time.sleep(5)
    base, peak, total = mem.before(0, t_handoff), mem.peak(0, t_handoff, time.time()), mem.total(0)
    healthy = ct.http_json(server.url + "/health_generate", timeout=60)[0] == 200
    restarts = ct.restarts_in_log(server.log_path)
    ok = healthy and restarts == 0 and peak is not None and peak < 0.99 * total
    grew = None if peak is None or base is None else peak - base
    return (
        PASS if ok else FAIL,
        f"SGLang alone {ct.gib(base)}; peak {ct.gib(peak)} (+{ct.gib(grew)}) of {ct.gib(total)} from the handoff "
        f"to 5 s after the trainer's first step ({first_step - t_handoff:.0f} s, on {trainer.spec.get('device')}); "
        f"trainer restarts {restarts}; server healthy after: {healthy}",
    )


def _first_swap_facts(server, handoff: str, trainer, traffic, t_traffic: float):
    _wait_first_swap(handoff)
    waited = time.time() - t_traffic
    traffic.stop()  # fewer publishes: the store and the live draft can be compared at one version
    st = trainer.snapshot()
    c = ct.wait_for(lambda: _facts_current(ct.read_counters(handoff).get(0, {})), 30, "no swap facts exported")
    bound = c.get("hot_is_worker_tensor")
    agree, note = _store_agrees(handoff, 30)
    ok = bound is True and c.get("failed_swaps", 0) == 0 and agree is not False
    return (
        PASS if ok else FAIL,
        f"swap to v{c.get('draft_version')} {waited:.0f} s after traffic began (trainer {st.get('train_steps', 0):.0f} "
        f"steps, {st.get('publishes', 0):.0f} publishes); hot_is_worker_tensor {bound}; {note}; "
        f"failed swaps {c.get('failed_swaps')}, refused {c.get('refused')}, rollbacks {c.get('rollbacks')}",
    )


def _facts_current(c: dict) -> dict | None:
    """The counters when their swap facts describe the version served now (else None)."""
    f = c.get("swap_facts") or {}
    return c if f.get("version") == c.get("draft_version") and "params" in f else None


def _store_agrees(handoff: str, timeout: float) -> tuple[bool | None, str]:
    """Whether the live draft (rank 0's swap facts) equals the weight store's active version, read
    here through CUDA IPC; None when the two never showed the same version within `timeout`."""
    import torch

    from aurora_sgl.transport.handoff import read_handoff
    from aurora_sgl.transport.weight_store import WeightStore

    from .swap_facts import expected_params, hot_digest

    spec = read_handoff(os.path.join(handoff, "handoff.json"))
    store = WeightStore.attach(spec["store"])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            v = store.version
            c = _facts_current(ct.read_counters(handoff).get(0, {}))
            polled = store.poll(v - 1) if c and c["swap_facts"]["version"] == v else None
            if polled is not None:
                if store._pub_event is not None:  # the trainer's copies into the buffer are done
                    torch.cuda.current_stream().wait_event(store._pub_event)
                state = dict(zip(store.names, polled[1]))
                expected = expected_params(state)
                hot = (state["d2t"] + torch.arange(state["d2t"].numel(), device=state["d2t"].device)).cpu()
                if store.version == v:  # not rewritten while read
                    diffs = differences(c["swap_facts"], expected, hot_digest(hot), spec.get("skipped", ()))
                    text = f"live draft == store v{v}" if not diffs else f"live draft != store v{v}: {diffs[0]}"
                    return not diffs, text
            time.sleep(0.5)
        return None, "store and live draft never at one version (not compared)"
    finally:
        store.close()


# ---- ring groups --------------------------------------------------------------------------------------
def group_ring_topk1(ctx: dict, out: Report) -> None:
    ring_group(ctx, out, "ring_topk1", "ring = eager, topk 1, ", [], RING_LABELS, d2t_row=D2T_ROW)


def group_ring_topk4(ctx: dict, out: Report) -> None:
    flags = ["--speculative-eagle-topk", "4", "--speculative-num-draft-tokens", "8"]
    ring_group(ctx, out, "ring_topk4", "ring = eager, topk 4, ", flags, RING_LABELS)


def group_no_overlap(ctx: dict, out: Report) -> None:
    ring_group(
        ctx,
        out,
        "no_overlap",
        NO_OVERLAP + "ring = eager, ",
        ["--disable-overlap-schedule"],
        ("padded graph batch", "chunked prefill"),
        d2t_row=NO_OVERLAP + "published permuted d2t reaches SGLang",
    )


def ring_group(ctx, out, name, prefix, flags, labels, d2t_row=None) -> None:
    """One plugin-only server: the scenarios, then (optionally) the d2t publish; the server stops
    and the target is recomputed eagerly on the freed GPU, one row per scenario."""
    from aurora_sgl.transport.handoff import read_handoff
    from aurora_sgl.transport.segments import sweep_stale
    from aurora_sgl.transport.signal_ring import SignalRing

    sweep_stale()
    port = ct.free_port()
    graph = ["--cuda-graph-max-bs-decode", str(ct.GRAPH_MAX_BS), "--chunked-prefill-size", "128"]
    sglang_args = ct.plugin_sglang_args(ctx["model_path"], ctx["draft_path"], port, graph + flags + ctx["extra"])
    captured, max_bs = ct.graph_batch_sizes(sglang_args)
    plan = ct.batch_plan(captured, max_bs)
    handoff = tempfile.mkdtemp(prefix=f"{name}_handoff_", dir=ctx["log_dir"])
    env = ct.plugin_env(_visible(ctx, 1), handoff)
    out.stage("launching")
    server = ct.Server(f"{name}_server", ct.plugin_server_argv(sglang_args), env, ctx["log_dir"], port, handoff)
    scenarios, reader = {}, None
    try:
        server.wait_ready()
        spec = read_handoff(os.path.join(server.handoff_dir(), "handoff.json"))
        reader = SignalRing.attach(spec["ring"])
        src = ct.TokenSource(ctx["model_path"])
        for label in labels:
            row = prefix + label
            out.stage(f"traffic: {label}")
            try:
                if label in plan or label in ("chunked prefill", "radix hit"):
                    scenarios[row] = _scenario(server, reader, label, plan, src)
                else:
                    out.row(row, SKIP, f"every batch size up to {max_bs} has a graph: {captured}")
            except Exception as e:
                traceback.print_exc()
                out.row(row, FAIL, one_line(e))
        if d2t_row:
            attempt(out, d2t_row, lambda: _d2t(server, spec, src))
    finally:
        if reader is not None:
            reader.close()
        server.stop()
    if scenarios:
        out.stage("eager recompute")
        _recompute_rows(ctx, out, spec, scenarios, max_bs)


def _scenario(server, reader, label: str, plan: dict, src) -> ct.Scenario:
    tag = {"batch 1": "b", "padded graph batch": "p", "above graph max batch": "a"}.get(label, label[0])
    if label in plan:
        n = plan[label]
        payloads = [
            {"input_ids": src.take(24 + (5 * i) % 40), "rid": ct.rid(tag, i), "sampling_params": ct.greedy(48)}
            for i in range(n)
        ]
        return ct.run_scenario(server, reader, label, [payloads], n)
    if label == "chunked prefill":  # 600 tokens in chunks of 128
        payload = {"input_ids": src.take(600), "rid": ct.rid("c", 0), "sampling_params": ct.greedy(32)}
        return ct.run_scenario(server, reader, label, [[payload]], 1)
    prefix = src.take(256)  # radix hit: the same prefix twice, the second request finds it cached
    sets = [
        [{"input_ids": prefix + src.take(16, bos=False), "rid": ct.rid("r", i), "sampling_params": ct.greedy(32)}]
        for i in range(2)
    ]
    return ct.run_scenario(server, reader, label, sets, 1)


def _recompute_rows(ctx, out, spec, scenarios: dict, max_bs: int) -> None:
    from .recompute import compare, eager_states

    try:
        target, dtype = eager_target(ctx["model_path"], spec["aux_layer_ids"], scenarios)
    except Exception as e:
        traceback.print_exc()
        for row in scenarios:
            out.row(row, FAIL, f"eager recompute could not start: {one_line(e)}")
        return
    tol = ctx["rel_tol"]
    for row, sc in scenarios.items():
        out.stage(f"recompute: {row}")
        try:
            states = {r: eager_states(target, seq) for r, seq in sc.sequences.items()}
            c = compare(sc.records, sc.sequences, states, len(spec["aux_layer_ids"]), sc.starts)
            extra_ok, note = scenario_facts(sc, max_bs)
            ok = c.ok(tol) and extra_ok
            out.row(row, PASS if ok else FAIL, f"{note}; {c.summary()} (recompute {dtype}, tol {tol})")
        except Exception as e:
            traceback.print_exc()
            out.row(row, FAIL, one_line(e))


def scenario_facts(sc: ct.Scenario, max_bs: int) -> tuple[bool, str]:
    """What the scenario must have exercised, from the plugin's counters and SGLang's answers:
    its batch size ran (the largest captured verify batch so far -- scenarios run in increasing
    batch order), prompts were prefilled in chunks, the second request of the radix pair hit."""
    d = sc.counters
    steps, most = d.get("captured", 0), sc.max_batch
    mean = sc.decode_steps() / steps if steps else 0.0
    note = f"{len(sc.sequences)} req, {steps} verify steps (mean batch {mean:.1f}, largest so far {most})"
    note += f", accept length {sc.accept_length:.2f}"
    ok = steps > 0
    n = len(sc.sequences)
    if sc.name in ("batch 1", "padded graph batch"):
        ok = ok and most == n
    elif sc.name == "above graph max batch":
        ok = ok and most is not None and most > max_bs
        note += f" (graph max {max_bs})"
    elif sc.name == "chunked prefill":
        chunks = d.get("prefill_captured", 0)
        ok = ok and chunks >= 2
        note += f", {chunks} prefill batches for {len(next(iter(sc.sequences.values())))} tokens"
    elif sc.name == "radix hit":
        cached = list(sc.starts.values())
        ok = ok and cached[-1] > 0
        note += f", cached tokens {cached}"
    bad = {k: v for k, v in d.items() if v and k not in ("captured", "records_written", "prefill_captured")}
    if bad:
        note += f", counters {bad}"
    return ok, note


def eager_target(model_path: str, aux_ids: list[int], scenarios: dict):
    """Our TargetModel on cuda:0 in float32 when the weights fit three times over in free memory,
    else in the served dtype (bf16 / fp16)."""
    import torch

    from aurora_sgl.engine.target import TargetModel, load_hf_causal_lm

    from .launcher import target_dtype

    served = getattr(torch, target_dtype(model_path) or "bfloat16")
    weights = sum(os.path.getsize(f) for f in _weight_files(model_path))
    free = _free_after_server(30)
    per = torch.finfo(served).bits // 8
    dtype = torch.float32 if weights * (4 / per) * 1.5 < free else served
    longest = max(len(s) for sc in scenarios.values() for s in sc.sequences.values())
    hf = load_hf_causal_lm(model_path, "cuda:0", dtype)
    return TargetModel(hf, 1, longest + 1, aux_ids), str(dtype).removeprefix("torch.")


def _free_after_server(timeout: float) -> int:
    """Free memory on cuda:0 once the stopped server's memory came back (it stops growing)."""
    import torch

    free, deadline = torch.cuda.mem_get_info(0)[0], time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(2)
        now = torch.cuda.mem_get_info(0)[0]
        if now <= free + (64 << 20):
            return now
        free = now
    return free


def _weight_files(path: str) -> list[str]:
    import glob

    files = glob.glob(os.path.join(path, "*.safetensors"))
    return files or glob.glob(os.path.join(path, "*.bin"))


def _d2t(server, spec: dict, src):
    """Act as the trainer: publish the served head with its draft vocabulary permuted -- d2t and the
    lm_head rows by one permutation, so the head drafts exactly as before -- and watch it arrive."""
    import torch

    from aurora_sgl.engine.draft_head import Eagle3Head
    from aurora_sgl.transport.weight_store import WeightStore

    from .swap_facts import expected_params, hot_digest

    handoff = server.handoff_dir()
    head = Eagle3Head.load(spec["draft_path"], torch.zeros(0))
    state = head.serving_state()
    served = {n: d for n, _, d in spec["store"]["layout"]}
    dtype = getattr(torch, served["lm_head.weight"])  # the draft's dtype in SGLang
    v1 = ct.wait_for(lambda: _facts_current(ct.read_counters(handoff).get(0, {})), 30, "no swap facts exported")
    loaded = differences(v1["swap_facts"], expected_params(state, dtype), None, spec.get("skipped", ()))
    probes = [{"input_ids": src.take(32), "rid": ct.rid("x", i), "sampling_params": ct.greedy(64)} for i in range(4)]
    before = _accept(server, probes)
    perm = torch.randperm(head.config.draft_vocab_size, generator=torch.Generator().manual_seed(13))
    hot = head.hot_ids[perm]
    state["d2t"] = hot - torch.arange(hot.numel())
    state["lm_head.weight"] = state["lm_head.weight"][perm]
    store = WeightStore.attach(spec["store"])
    try:
        layout = store.layout
        state = {n: state[n].to(device=store.device, dtype=layout[n][1]) for n in store.names}
        version = store.publish(state)
        t0 = time.monotonic()
        c = ct.wait_for(
            lambda: (x := _facts_current(ct.read_counters(handoff).get(0, {}))) and x["draft_version"] == version and x,
            60,
            f"the published version {version} was not swapped in",
        )
        took_s = time.monotonic() - t0
    finally:
        store.close()
    expected = expected_params({n: t.cpu() for n, t in state.items()})
    diffs = differences(c["swap_facts"], expected, hot_digest(hot), spec.get("skipped", ()))
    after = _accept(server, probes)
    bound = c.get("hot_is_worker_tensor")
    same = "n/a (acceptance too low to tell: a day-0 head)"
    drafts_ok = True
    if before >= 1.5:
        drafts_ok = after >= 0.9 * before
        same = f"{before:.2f} -> {after:.2f}"
    ok = not diffs and bound is True and drafts_ok
    return (
        PASS if ok else FAIL,
        f"v{version} swapped in {took_s:.1f} s; live params and hot map == published: {not diffs}"
        f"{'' if not diffs else ' (' + diffs[0] + ')'}; hot_is_worker_tensor {bound}; accept length (same drafts) "
        f"{same}; v1 == checkpoint: {not loaded}{'' if not loaded else ' (' + loaded[0] + ')'}",
    )


def _accept(server, payloads: list[dict]) -> float:
    outs = [server.generate(dict(p, rid=p["rid"] + str(time.monotonic_ns())[-6:])) for p in payloads]
    acc = [float(o["meta_info"].get("spec_accept_length", 0.0)) for o in outs]
    return sum(acc) / len(acc)


# ---- multi-GPU and throughput ---------------------------------------------------------------------------
def group_two_gpus(ctx: dict, out: Report) -> None:
    name = GROUPS[4].rows[0]
    mem = ct.GpuMemory(ctx["gpus"][:2]).start()
    out.stage("launching")
    server = _launch(ctx, "two_gpus_server", 2)
    trainer = traffic = None
    try:
        server.wait_ready()
        handoff = server.handoff_dir()
        t_handoff = os.path.getmtime(os.path.join(handoff, "handoff.json"))
        trainer = ct.TrainerWatch(handoff, server.proc.pid)
        traffic = ct.Traffic(server, 16, 128).start()
        t0 = time.time()

        def check():
            c = _wait_first_swap(handoff)[0]
            waited = time.time() - t0
            trainer.snapshot()
            device, pid = trainer.spec.get("device"), trainer.pid()
            on = [mem.process_memory(i).get(pid) for i in range(2)] if pid else [None, None]
            base, peak = mem.before(0, t_handoff), mem.peak(0, t_handoff, time.time())
            ok = device == "cuda:1" and c.get("swaps", 0) >= 1
            return (
                PASS if ok else FAIL,
                f"trainer on {device} (pid {pid}: {ct.gib(on[1])} on GPU 1, {ct.gib(on[0])} on GPU 0 -- its CUDA "
                f"IPC mapping of the ring and store); first swap {waited:.0f} s after traffic began; GPU 0 "
                f"{ct.gib(base)} before the trainer, peak {ct.gib(peak)} since",
            )

        attempt(out, name, check)
    finally:
        if traffic is not None:
            traffic.stop()
        if trainer is not None:
            trainer.close()
        server.stop()
        mem.stop()


def group_tp2(ctx: dict, out: Report) -> None:
    name = GROUPS[5].rows[0]
    n = min(3, len(ctx["gpus"]))  # a third GPU, when there is one, is the trainer's
    out.stage("launching")
    server = _launch(ctx, "tp2_server", n, extra=["--tp-size", "2"])
    traffic = None
    try:
        ready = server.wait_ready()
        handoff = server.handoff_dir()
        with open(os.path.join(handoff, "handoff.json")) as f:
            mode = json.load(f).get("swap_mode")
        traffic = ct.Traffic(server, 16, 128).start()
        t0 = time.time()

        def check():
            _wait_first_swap(handoff, ranks=(0, 1))
            waited = time.time() - t0
            traffic.stop()
            c = ct.wait_for(lambda: _tp_facts(ct.read_counters(handoff)), 60, "the ranks' swap facts never agreed")
            v = [c[r]["draft_version"] for r in (0, 1)]
            same_hot = c[0]["swap_facts"].get("hot_digest") == c[1]["swap_facts"].get("hot_digest")
            failed = sum(c[r].get("failed_swaps", 0) for r in (0, 1))
            ok = v[0] == v[1] and same_hot and failed == 0
            return (
                PASS if ok else FAIL,
                f"ready in {ready:.0f} s; both ranks swapped (v{v[0]} / v{v[1]}) {waited:.0f} s after traffic "
                f"began; one hot map on both: {same_hot}; failed swaps {failed}; swap mode {mode}; {n} GPUs",
            )

        attempt(out, name, check)
    finally:
        if traffic is not None:
            traffic.stop()
        server.stop()


def _tp_facts(counters: dict) -> dict | None:
    """Both ranks' counters when their swap facts describe the same served version."""
    c = [_facts_current(counters.get(r, {})) for r in (0, 1)]
    if all(c) and c[0]["draft_version"] == c[1]["draft_version"] and "hot_digest" in c[0]["swap_facts"]:
        return {0: c[0], 1: c[1]}
    return None


def group_throughput(ctx: dict, out: Report) -> None:
    name = GROUPS[6].rows[0]

    def check():
        n = min(2, len(ctx["gpus"]))  # with two, the trainer has the second (the production recipe)
        got = {}
        for online in (False, True):
            out.stage(f"throughput, online={online}")
            got[online] = _measure(ctx, n, online)
        off, on = got[False], got[True]
        ratio = on["tps"] / off["tps"] if off["tps"] else 0.0
        ok = off["tps"] > 0 and on["tps"] > 0 and not off["errors"] and not on["errors"]
        return (
            PASS if ok else FAIL,
            f"offline {off['tps']:.0f} tok/s (accept {off['accept']:.2f}), online {on['tps']:.0f} tok/s (accept "
            f"{on['accept']:.2f}, {on['swaps']} swaps, trainer on {on['device']}): ratio {ratio:.2f}; "
            f"{off['requests']} / {on['requests']} requests x 256 tokens in {MEASURE_S} s; {n} GPU(s); "
            f"request errors {len(off['errors'])} / {len(on['errors'])}",
        )

    attempt(out, name, check)


MEASURE_S, WARMUP_S = 30, 10


def _measure(ctx: dict, n: int, online: bool) -> dict:
    server = _launch(ctx, f"throughput_{'online' if online else 'offline'}_server", n, online=online)
    traffic = trainer = None
    try:
        server.wait_ready()
        device = None
        if online:
            handoff = server.handoff_dir()
            trainer = ct.TrainerWatch(handoff, server.proc.pid)
            ct.wait_for(lambda: trainer.snapshot().get("heartbeat", 0) > 0, 300, "the trainer never started")
            device = trainer.spec.get("device")
        traffic = ct.Traffic(server, 48, 256).start()
        time.sleep(WARMUP_S)
        t0 = time.time()
        time.sleep(MEASURE_S)
        t1 = time.time()
        reqs, toks, acc = traffic.window(t0, t1)
        swaps = ct.read_counters(server.handoff_dir()).get(0, {}).get("swaps", 0) if online else 0
        return {
            "tps": toks / (t1 - t0),
            "requests": reqs,
            "accept": acc,
            "swaps": swaps,
            "device": device,
            "errors": list(traffic.errors),
        }
    finally:
        if traffic is not None:
            traffic.stop()
        if trainer is not None:
            trainer.close()
        server.stop()


# ---- entry points ----------------------------------------------------------------------------------
def group_main(target: str, context_path: str, rows_path: str) -> int:
    """Child side: run one group, its rows into `rows_path`; an exception becomes its `error`."""
    out = Report(rows_path)
    with open(context_path) as f:
        ctx = json.load(f)
    module, _, fn = target.partition(":")
    try:
        getattr(importlib.import_module(module), fn)(ctx, out)
    except Exception as e:
        traceback.print_exc()
        out.error(one_line(e))
        return 1
    out.done()
    return 0


def default_draft(model_path: str, draft_path: str | None, log_dir: str) -> str:
    """The head the plugin-only servers serve: --draft-path, else the built-in reference head when
    the target is the reference model (it drafts well: the d2t check then sees acceptance), else a
    day-0 head made here."""
    from aurora_sgl import reference_head_path, reference_model_path

    if draft_path:
        return os.path.abspath(draft_path)
    if os.path.realpath(model_path) == os.path.realpath(reference_model_path()):
        return reference_head_path()
    from .launcher import day0_head

    return day0_head(model_path, os.path.join(log_dir, "day0_head"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="launch/device_check.sh --sglang",
        description="GPU check of the SGLang backend; flags it does not know go to every SGLang launch.",
        allow_abbrev=False,
    )
    ap.add_argument("--model-path", default=None, help="target (default: the built-in reference model, bf16)")
    ap.add_argument("--draft-path", default=None, help="head for the ring and d2t checks (default: see docs)")
    ap.add_argument("--only", default=None, help=f"comma-separated groups: {', '.join(g.name for g in GROUPS)}")
    ap.add_argument("--json", default=None, help="also write the table here as JSON")
    ap.add_argument("--log-dir", default=None, help="server and check logs (default: a new dir under /tmp)")
    ap.add_argument("--rel-tol", type=float, default=None, help="ring vs recompute relative error allowed")
    ap.add_argument("--group", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--context", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args, extra = ap.parse_known_args(argv)
    if args.group:
        return group_main(args.group, args.context, args.rows)
    problem = preflight("launch/device_check.sh --sglang", instead="")
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    groups = GROUPS
    if args.only:
        names = {n.strip() for n in args.only.split(",")}
        unknown = names - {g.name for g in GROUPS}
        if unknown:
            print(f"error: unknown group(s) {', '.join(sorted(unknown))}", file=sys.stderr)
            return 2
        groups = tuple(g for g in GROUPS if g.name in names)
    return run(args, extra, groups)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(args, extra: list[str], groups) -> int:
    import torch

    from aurora_sgl import reference_model_path

    from .recompute import REL_TOL

    t0 = time.monotonic()
    log_dir = os.path.abspath(args.log_dir or tempfile.mkdtemp(prefix=time.strftime("aurora_sglang_check_%m%d_%H%M_")))
    os.makedirs(log_dir, exist_ok=True)
    model = os.path.abspath(args.model_path or reference_model_path())
    count = torch.cuda.device_count()
    ctx = {
        "model_path": model,
        "draft_path": default_draft(model, args.draft_path, log_dir),
        "extra": list(extra),
        "log_dir": log_dir,
        "gpus": ct.visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"), count),
        "rel_tol": args.rel_tol if args.rel_tol is not None else REL_TOL,
    }
    signal.signal(signal.SIGTERM, _interrupt)
    rows = run_groups(groups, ctx, count, BUDGET_S, progress=lambda s: print(f"[sglang check] {s}", file=sys.stderr))
    import sglang

    name = torch.cuda.get_device_name(0)
    rows.append(("total", "", f"{time.monotonic() - t0:.0f} s on {count} x {name}, sglang {sglang.__version__}"))
    print(format_table(rows))
    print(f"{took(time.monotonic() - t0)}; logs in {log_dir}")
    table = [dict(zip(("check", "result", "detail"), r)) for r in rows]
    for path in {args.json, os.path.join(log_dir, "table.json")} - {None}:
        with open(path, "w") as f:
            json.dump(table, f, indent=2)
    return 0 if all(r[1] != FAIL for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
