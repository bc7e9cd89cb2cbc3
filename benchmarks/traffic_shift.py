"""Traffic shift: does online training keep speculation good while the traffic changes domain?

    python benchmarks/traffic_shift.py --shift sharp --out benchmarks/results/traffic_shift_sharp.json
    python benchmarks/traffic_shift.py --quick --out /tmp/ts.json            # <= 3 min, run by a test
    python benchmarks/traffic_shift.py --url http://127.0.0.1:30000 --out F  # drive a running server

A stream of prompts is replayed, in order, through each arm with at most `--concurrency` requests
in flight (the way a server sees traffic). Streams (`--shift`):
  sharp   phase after phase: HumanEval -> MT-Bench (first turns) -> GSM8K test, `--requests-per-phase` each;
  smooth  the same total, the domain mixture drifting linearly from the first domain to the last;
  return  sharp, then phase 1's domain once more (how much does coming back cost?).
`--stream a.jsonl,b.jsonl,...` replaces the three datasets (rows with `prompt`, chat `messages`, or
the datasets' own fields; see aurora_sgl/training/prompts.py); a row's `json_schema` or `regex` constrains
that request's output (structured traffic). A phase longer than its file cycles through it again in a
new order.

Arms (same stream, same per-request seeds):
  nospec         the engine without speculation (K = 0): the tokens/s baseline;
  static         a head trained offline on phase 1's domain only (code), never updated;
  offline        the reference head trained offline on the reference corpus (code, math, prose), never updated;
  day0           online training from a random head;
  online_static  online training starting from the static head.
Speculative arms choose K per step (0..`--k`, engine/adaptive.py) as the server does, unless
`--fixed-k`; their accept length is then per drafting step, and `k_steps` counts the steps per K.
Online arms run `OnlineTraining` + `Engine` in this process -- the objects the server runs, the
trainer in its own process. With `--url` the script instead drives a running server through
POST /generate and reads `spec_accept_length`, `spec_accept_per_position` and `draft_version` from
meta_info; the server's own configuration is then the (single) arm.

Per request: accept length, acceptance per draft position, tokens/s, draft version, trainer steps.
`summary`: per-phase accept length per arm, `online_over_static_after_shift`, `day0_over_offline`,
`recovery_requests` per shift, `return_retention`; a PNG of windowed accept length per arm.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common.paths import datasets_dir  # noqa: E402

DATA = datasets_dir()
DEFAULT_STREAM = [
    DATA / "humaneval" / "HumanEval.jsonl.gz",
    DATA / "mt_bench" / "question.jsonl",
    DATA / "gsm8k" / "test.jsonl",
]
STATIC_HEAD = REPO / "aurora_sgl" / "reference_heads" / "code"
ARMS = ("nospec", "static", "offline", "day0", "online_static")
ONLINE_ARMS = ("day0", "online_static")
SHIFTS = ("sharp", "smooth", "return")
QUICK = {"requests_per_phase": 8, "max_tokens": 32, "window": 4}
CONSTRAINTS = ("json_schema", "regex")  # per-request output constraints a stream row may carry
RECOVERY_TOLERANCE = 0.10  # "back within 10% of the pre-shift level"


class UsageError(Exception):
    pass


# ---- the stream -----------------------------------------------------------------------------------
def domain_name(path: Path) -> str:
    name = path.name
    for suffix in (".gz", ".jsonl", ".json", ".txt"):
        name = name.removesuffix(suffix)
    return path.parent.name if name in ("test", "question", "train", "HumanEval") else name


def _cycled(prompts: list, rng: random.Random):
    """Endless draws from `prompts`: each pass a fresh permutation (a phase may outrun its file)."""
    while True:
        order = list(range(len(prompts)))
        rng.shuffle(order)
        for i in order:
            yield i, prompts[i]


def build_stream(domains: list[tuple[str, list[str | dict]]], shift: str, per_phase: int, seed: int) -> list[dict]:
    """[{index, phase, domain, prompt_index, prompt[, json_schema | regex]}] in arrival order; a
    domain's prompts are texts or rows of `load_prompt_rows`. Phases index `domains`
    (return: phase len(domains) is domain 0 again). smooth: request i draws its domain from a mixture
    whose weight moves linearly from the first domain to the last over the stream."""
    rng = random.Random(seed)
    draws = [_cycled(prompts, random.Random(seed * 1000 + d)) for d, (_, prompts) in enumerate(domains)]
    plan: list[tuple[int, int]] = []  # (phase, domain index)
    if shift in ("sharp", "return"):
        order = list(range(len(domains))) + ([0] if shift == "return" else [])
        for phase, d in enumerate(order):
            plan += [(phase, d)] * per_phase
    else:
        total = per_phase * len(domains)
        for i in range(total):
            x = (len(domains) - 1) * i / max(1, total - 1)  # position along the domain axis
            lo = min(int(x), len(domains) - 1)
            d = lo + 1 if lo + 1 < len(domains) and rng.random() < x - lo else lo
            plan.append((min(i // per_phase, len(domains) - 1), d))
    stream = []
    for index, (phase, d) in enumerate(plan):
        pi, item = next(draws[d])
        row = item if isinstance(item, dict) else {"prompt": item}
        stream.append({"index": index, "phase": phase, "domain": domains[d][0], "prompt_index": pi, **row})
    return stream


# ---- running one arm in process ---------------------------------------------------------------------
class TrainerStalled(RuntimeError):
    pass


class TrainerBudget:
    """Lockstep with a modelled trainer device: `wait` returns once the trainer has trained at least
    `ratio` x `recorded` positions (a position counts once per optimizer step whose loss includes
    it, fresh or replayed; context-only rows count too: device_positions). Serving itself never
    waits for the trainer: only this driver does."""

    def __init__(self, ratio: float, stall_s: float):
        self.ratio, self.stall_s = ratio, stall_s
        self.waited_s = 0.0

    def wait(self, recorded: int, trainer_state) -> None:
        t0 = time.monotonic()
        last_progress, last_trained = t0, None
        while True:
            trained = device_positions(trainer_state())
            if trained >= self.ratio * recorded:
                break
            now = time.monotonic()
            if trained != last_trained:
                last_progress, last_trained = now, trained
            elif now - last_progress > self.stall_s:
                raise TrainerStalled(
                    f"the trainer made no progress for {self.stall_s:.0f} s "
                    f"({trained} positions trained, budget {self.ratio} x {recorded} recorded)"
                )
            time.sleep(0.01)
        self.waited_s += time.monotonic() - t0


def device_positions(trainer: dict) -> int:
    """What the modelled device has spent: positions trained, and rows run over as context only
    (those before the new positions of a running request's cut, TrainerConfig.cut_open_positions)."""
    return int((trainer.get("trained_positions") or 0) + (trainer.get("context_positions") or 0))


def positions_ratio(trainer: dict, recorded: int, counter: str = "trained_positions") -> float | None:
    """`counter` (trained_positions, or fresh_positions: trained at least once) per recorded position."""
    return round((trainer.get(counter) or 0) / recorded, 3) if recorded else None


def run_arm_inprocess(arm: str, stream: list[dict], args, hf, tokenizer) -> dict:
    import torch

    from aurora_sgl import reference_model_path
    from aurora_sgl.engine.engine import Engine
    from aurora_sgl.engine.sampling import SamplingParams

    head = {"static": args.static_head, "online_static": args.static_head, "offline": args.offline_head}.get(arm)
    k = 0 if arm == "nospec" else args.k
    engine = Engine(
        num_speculative_steps=k,
        max_running_requests=args.concurrency,
        draft_model_path=head,
        model=hf,
        tokenizer=tokenizer,
        seed=args.seed,
        adaptive=not args.fixed_k,
    )
    k_steps = [0] * (k + 1)  # decode steps per K chosen, over the arm
    online = None
    if arm in ONLINE_ARMS:
        from aurora_sgl.online.sidecar import OnlineTraining

        online = OnlineTraining(
            engine,
            model_path=reference_model_path(),
            objective=args.objective,
            init_head=head,
            fallback_to_start=args.fallback_head,
            trainer_config=args.trainer_config,
            trainer_threads=1,
        )
        online.start()
        if not online.wait_for_trainer(120):
            online.close()
            raise RuntimeError("the trainer did not start within 120 s")
    params = [
        SamplingParams(
            max_new_tokens=args.max_tokens,
            temperature=args.temperature,
            seed=args.seed + r["index"],
            **{key: r[key] for key in CONSTRAINTS if key in r},
        )
        for r in stream
    ]
    rows: list[dict | None] = [None] * len(stream)
    in_flight: dict[str, tuple[int, object, float]] = {}
    budget = TrainerBudget(args.trainer_budget, args.stall_seconds) if online and args.trainer_budget else None
    nxt = 0
    bar = _progress(len(stream), arm)
    t_start = time.perf_counter()
    try:
        while nxt < len(stream) or in_flight:
            while nxt < len(stream) and len(in_flight) < args.concurrency:
                if budget is not None:
                    budget.wait(online.flywheel.recorded_positions, lambda: online.trainer_state())
                req = engine.add_request(stream[nxt]["prompt"], params[nxt])
                in_flight[req.id] = (nxt, req, time.perf_counter())
                nxt += 1
            engine.step()
            now = time.perf_counter()
            for rid, (i, req, t0) in list(in_flight.items()):
                if not req.finished:
                    continue
                del in_flight[rid]
                meta = req.meta_info()
                k_steps = [a + b for a, b in zip(k_steps, meta["spec_k_steps"])]
                steps = online.trainer_state()["train_steps"] if online else None
                rows[i] = _row(
                    stream[i],
                    meta["spec_accept_length"] if meta["spec_verify_ct"] else 1.0,
                    meta["spec_accept_per_position"],
                    head_accept_length(meta["spec_accept_per_position"], meta["spec_verify_ct"]),
                    meta["completion_tokens"],
                    meta["prompt_tokens"],
                    now - t0,
                    meta["draft_version"],
                    steps,
                    now - t_start,
                    engine.output_text(req) if any(key in stream[i] for key in CONSTRAINTS) else None,
                )
                rows[i]["draft_head"] = meta["spec_draft_head"]
                rows[i]["k_steps"] = meta["spec_k_steps"]  # decode steps per K chosen
                bar.update(1)
        wall = time.perf_counter() - t_start
        extra = {"k_steps": k_steps, "adaptive": engine.adaptive.stats() if engine.adaptive else None}
        if online is not None:
            extra |= {
                "trainer": online.trainer_state(),
                "flywheel": online.flywheel.stats(),
                "positions_per_recorded_position": positions_ratio(
                    online.trainer_state(), online.flywheel.recorded_positions
                ),
                "fresh_per_recorded_position": positions_ratio(
                    online.trainer_state(), online.flywheel.recorded_positions, "fresh_positions"
                ),
                "budget_wait_s": round(budget.waited_s, 2) if budget else None,
                "trainer_config": dict(args.trainer_config or {}, objective=args.objective),
            }
    finally:
        bar.close()
        if online is not None:
            online.close()
    del engine
    torch.set_num_threads(1)
    return _arm_result(rows, wall, head, extra)


def head_accept_length(per_position: list[float] | None, drafting_steps: int | None) -> float | None:
    """The accept length a chain of every draft position would have had: 1 + the sum over positions
    j of P(drafts 1..j accepted | the step drafted j). At a fixed K it is the request's accept
    length; under adaptive K it does not depend on how many steps drafted how far (a request served
    mostly at K = 0 has a served accept length near 1 whatever its head), so it measures the head.
    None when the request never drafted (nothing measured); 1.0 without draft positions (K = 0)."""
    if per_position is None:
        return None
    if not per_position:
        return 1.0
    return round(1.0 + sum(per_position), 4) if drafting_steps else None


def _row(item, tau, per_pos, head_tau, completion, prompt, latency, version, steps, t, text) -> dict:
    constraint = next((key for key in CONSTRAINTS if key in item), None)
    return {
        "index": item["index"],
        "phase": item["phase"],
        "domain": item["domain"],
        "accept_length": tau,  # as served: 1 + accepted drafts per drafting step (1.0 if none)
        "head_accept_length": head_tau,
        "accept_per_position": per_pos,
        "completion_tokens": completion,
        "prompt_tokens": prompt,
        "latency_s": round(latency, 4),
        "tokens_per_s": round(completion / latency, 2) if latency > 0 else None,
        "draft_version": version,
        "trainer_steps": steps,
        "finished_at_s": round(t, 3),
        # A constrained request keeps its output, so a reader can check the constraint held.
        **({"constraint": constraint, "text": text} if constraint else {}),
    }


def _arm_result(rows, wall, head, extra) -> dict:
    tokens = sum(r["completion_tokens"] for r in rows)
    steps = rows[-1]["trainer_steps"] if rows and rows[-1]["trainer_steps"] is not None else None
    return {
        "head": str(head) if head else None,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "trainer_steps_per_request": round(steps / len(rows), 4) if steps is not None else None,
        **extra,
        "requests": rows,
    }


# ---- running against a server -----------------------------------------------------------------------
def run_arm_url(arm: str, stream: list[dict], args) -> dict:
    import asyncio

    import httpx

    rows: list[dict | None] = [None] * len(stream)
    bar = _progress(len(stream), arm)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    waited = [0.0]

    async def main():
        sem = asyncio.Semaphore(args.concurrency)
        budget_lock = asyncio.Lock()
        t_start = time.perf_counter()
        async with httpx.AsyncClient(base_url=args.url, timeout=600, headers=headers) as client:

            async def server_counts() -> tuple[int, dict]:
                stats = (await client.get("/aurora/stats")).json()
                return (stats.get("flywheel") or {}).get("recorded_positions", 0), stats.get("trainer") or {}

            async def wait_for_budget():
                # The server runs the budgeted trainer itself (--trainer-config '{"position_budget": R}').
                t0 = time.monotonic()
                last, since = None, t0
                while True:
                    recorded, trainer = await server_counts()
                    trained = device_positions(trainer)
                    if trained >= args.trainer_budget * recorded:
                        break
                    if trained != last:
                        last, since = trained, time.monotonic()
                    elif time.monotonic() - since > args.stall_seconds:
                        raise TrainerStalled(f"the server's trainer made no progress for {args.stall_seconds:.0f} s")
                    await asyncio.sleep(0.05)
                waited[0] += time.monotonic() - t0

            async def one(item):
                async with sem:
                    if args.trainer_budget:
                        async with budget_lock:
                            await wait_for_budget()
                    body = {
                        "text": item["prompt"],
                        "sampling_params": {
                            "max_new_tokens": args.max_tokens,
                            "temperature": args.temperature,
                            "seed": args.seed + item["index"],
                            **{key: item[key] for key in CONSTRAINTS if key in item},
                        },
                    }
                    t0 = time.perf_counter()
                    resp = await client.post("/generate", json=body)
                    now = time.perf_counter()
                    if resp.status_code != 200:
                        raise RuntimeError(f"{args.url}/generate answered {resp.status_code}: {resp.text[:200]}")
                    meta = resp.json()["meta_info"]
                    tau = meta.get("spec_accept_length") or 1.0
                    per_pos = meta.get("spec_accept_per_position")
                    # SGLang's server reports no per-position acceptance: its accept length then (a fixed K).
                    head_tau = head_accept_length(per_pos, meta.get("spec_verify_ct")) if per_pos is not None else tau
                    rows[item["index"]] = _row(
                        item,
                        tau,
                        per_pos,
                        head_tau,
                        meta.get("completion_tokens", 0),
                        meta.get("prompt_tokens", 0),
                        now - t0,
                        meta.get("draft_version"),
                        None,
                        now - t_start,
                        resp.json().get("text"),
                    )
                    rows[item["index"]]["draft_head"] = meta.get("spec_draft_head")
                    rows[item["index"]]["k_steps"] = meta.get("spec_k_steps")
                    bar.update(1)

            await asyncio.gather(*(one(item) for item in stream))
            recorded, trainer = await server_counts()
            extra["positions_per_recorded_position"] = positions_ratio(trainer, recorded)
            extra["fresh_per_recorded_position"] = positions_ratio(trainer, recorded, "fresh_positions")
        return time.perf_counter() - t_start

    extra = {"url": args.url}
    try:
        wall = asyncio.run(main())
    finally:
        bar.close()
    extra["budget_wait_s"] = round(waited[0], 2) if args.trainer_budget else None
    return _arm_result(rows, wall, None, extra)


def _progress(total: int, arm: str):
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc=f"{arm:>13}", unit="req", file=sys.stderr, leave=True)
    except ImportError:  # a plain counter keeps the script usable without tqdm

        class _Quiet:
            def update(self, n):
                pass

            def close(self):
                pass

        return _Quiet()


# ---- figures --------------------------------------------------------------------------------------
def known_mean(values: list[float | None]) -> float | None:
    """Mean of the values that are known (a request that never drafted has no head figure)."""
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def head_taus(rows: list[dict]) -> list[float | None]:
    """Per request, the head's accept length (`head_accept_length`). Rows written before it existed:
    from their per-position acceptance and K counts where they have them, else their accept length
    (older runs drafted a fixed K, where it is the same figure)."""
    out = []
    for r in rows:
        if "head_accept_length" in r:
            out.append(r["head_accept_length"])
        elif r.get("k_steps") and r.get("accept_per_position") is not None:
            out.append(head_accept_length(r["accept_per_position"], sum(r["k_steps"][1:])))
        else:
            out.append(r["accept_length"])
    return out


def windowed(values: list[float | None], window: int) -> list[float | None]:
    """Trailing mean over the known values among the last `window` (fewer at the start)."""
    return [known_mean(values[max(0, i - window + 1) : i + 1]) for i in range(len(values))]


def recovery_requests(
    taus: list[float | None], shift_at: int, end: int, window: int, tolerance: float = RECOVERY_TOLERANCE
) -> int | None:
    """Requests after the shift at `shift_at` until the trailing window (wholly after the shift)
    is back within `tolerance` of the last pre-shift window; None if not before `end`."""
    if shift_at < window:
        return None
    before = known_mean(taus[shift_at - window : shift_at])
    if before is None:
        return None
    for i in range(shift_at + window - 1, end):
        now = known_mean(taus[i - window + 1 : i + 1])
        if now is not None and now >= (1 - tolerance) * before:
            return i - shift_at + 1
    return None


def phase_bounds(stream: list[dict]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for i in range(1, len(stream) + 1):
        if i == len(stream) or stream[i]["phase"] != stream[start]["phase"]:
            bounds.append((start, i))
            start = i
    return bounds


def phase_label(stream: list[dict], start: int, end: int, shift: str) -> str:
    """A sharp phase is one domain; a smooth 'phase' is a stretch of the drifting mixture."""
    if shift != "smooth":
        return stream[start]["domain"]
    doms = [r["domain"] for r in stream[start:end]]
    return "+".join(sorted(set(doms), key=doms.index)) if len(set(doms)) > 1 else doms[0]


def _ratio(a, b):
    return round(a / b, 4) if a is not None and b else None


def _round(x):
    return None if x is None else round(x, 4)


def summarize(arms: dict, stream: list[dict], window: int, shift: str) -> dict:
    """The issue's figures from each head's accept length (`head_taus`: at a fixed K the accept
    length; under adaptive K the chain every draft position would have made, so they compare heads,
    not the K each arm happened to choose); `served_phase_tau` is the accept length as served."""
    bounds = phase_bounds(stream)
    taus = {a: head_taus(res["requests"]) for a, res in arms.items()}
    phase_tau = {a: [_round(known_mean(t[s:e])) for s, e in bounds] for a, t in taus.items()}
    served = {a: [r["accept_length"] for r in res["requests"]] for a, res in arms.items()}
    out: dict = {
        "window": window,
        "phases": [
            {"phase": stream[s]["phase"], "domain": phase_label(stream, s, e, shift), "requests": e - s}
            for s, e in bounds
        ],
        "phase_tau": phase_tau,
        "served_phase_tau": {a: [round(statistics.fmean(t[s:e]), 4) for s, e in bounds] for a, t in served.items()},
        "tokens_per_s": {a: res["tokens_per_s"] for a, res in arms.items()},
        "speedup_over_nospec": {
            a: _ratio(res["tokens_per_s"], arms["nospec"]["tokens_per_s"]) for a, res in arms.items()
        }
        if "nospec" in arms
        else None,
        "trainer_steps_per_request": {a: res.get("trainer_steps_per_request") for a, res in arms.items()},
        "positions_per_recorded_position": {
            a: res.get("positions_per_recorded_position") for a, res in arms.items() if a in ONLINE_ARMS or "url" in res
        },
        "fresh_per_recorded_position": {
            a: res.get("fresh_per_recorded_position") for a, res in arms.items() if a in ONLINE_ARMS or "url" in res
        },
    }
    after = slice(1, None)

    def mean_after(a):
        return known_mean(phase_tau[a][after]) if a in phase_tau and len(bounds) > 1 else None

    out["online_over_static_after_shift"] = _ratio(mean_after("online_static"), mean_after("static"))
    n = len(stream)
    w = min(window, n)
    last = {a: known_mean(t[n - w :]) for a, t in taus.items()}
    out["last_window_tau"] = {a: _round(v) for a, v in last.items()}
    # "offline": the head trained offline on the reference corpus; the static code-only head too.
    out["day0_over_offline"] = _ratio(last.get("day0"), last.get("offline"))
    out["day0_over_static"] = _ratio(last.get("day0"), last.get("static"))
    if shift != "smooth":
        shifts = [s for s, _ in bounds[1:]]
        ends = [e for _, e in bounds[1:]]
        out["recovery_requests"] = {
            a: [recovery_requests(t, s, e, window) for s, e in zip(shifts, ends)]
            for a, t in taus.items()
            if a != "nospec"
        }
        # The measure compares with the old domain's level, which a harder new domain never
        # reaches whatever the head; this one compares with where the arm ends the phase.
        out["settle_requests"] = {}
        for a, t in taus.items():
            if a == "nospec":
                continue
            settle, wins = [], windowed(t, window)
            for s, e in zip(shifts, ends):
                final = known_mean(t[max(s, e - window) : e])
                settle.append(
                    next(
                        (
                            i - s + 1
                            for i in range(s + window - 1, e)
                            if final is not None and wins[i] is not None and wins[i] >= (1 - RECOVERY_TOLERANCE) * final
                        ),
                        None,
                    )
                )
            out["settle_requests"][a] = settle
    if shift == "return" and len(bounds) >= 2:
        (s1, e1), (sr, er) = bounds[0], bounds[-1]
        out["return_retention"] = {
            a: _ratio(known_mean(t[sr : min(er, sr + window)]), known_mean(t[max(s1, e1 - window) : e1]))
            for a, t in taus.items()
            if a != "nospec"
        }
    return out


def plot(arms: dict, stream: list[dict], window: int, path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(10, 5))
    for arm, res in arms.items():
        t = head_taus(res["requests"])
        w = [math.nan if v is None else v for v in windowed(t, window)]
        ax.plot(range(1, len(t) + 1), w, label=arm, linewidth=1.4)
    for s, _ in phase_bounds(stream)[1:]:
        ax.axvline(s + 0.5, color="grey", linestyle=":", linewidth=1)
    for s, e in phase_bounds(stream):
        ax.text(
            (s + e) / 2,
            1.0,
            phase_label(stream, s, e, "smooth" if "smooth" in title else "sharp"),
            ha="center",
            va="bottom",
            fontsize=8,
            color="grey",
        )
    ax.set_xlabel("request number")
    ax.set_ylabel(f"accept length (trailing mean of {window} requests)")
    ax.set_title(title)
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def print_table(summary: dict, arms: dict) -> None:
    domains = [p["domain"] for p in summary["phases"]]
    head = f"{'arm':>13} | " + " | ".join(f"{d[:10]:>10}" for d in domains) + " |  tok/s | steps/req"
    print(head)
    print("-" * len(head))
    for a, taus in summary["phase_tau"].items():
        spr = summary["trainer_steps_per_request"].get(a)
        print(
            f"{a:>13} | "
            + " | ".join(f"{t:>10.3f}" if t is not None else f"{'-':>10}" for t in taus)
            + f" | {arms[a]['tokens_per_s']:>6.1f} | {spr if spr is not None else '-':>9}"
        )
    for key in (
        "online_over_static_after_shift",
        "day0_over_offline",
        "day0_over_static",
        "recovery_requests",
        "settle_requests",
        "return_retention",
        "positions_per_recorded_position",
        "fresh_per_recorded_position",
    ):
        if key in summary:
            print(f"{key}: {json.dumps(summary[key])}")


# ---- CLI ------------------------------------------------------------------------------------------
def parse_args(argv) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python benchmarks/traffic_shift.py", description=__doc__.splitlines()[0])
    ap.add_argument("--shift", choices=SHIFTS, default="sharp")
    ap.add_argument(
        "--stream",
        default=None,
        help="comma-separated prompt files, one per phase (default: "
        "HumanEval, MT-Bench, GSM8K test from ../shared/datasets)",
    )
    ap.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    ap.add_argument("--requests-per-phase", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    ap.add_argument("--k", type=int, default=4, help="draft tokens per step (the most, when adaptive)")
    ap.add_argument(
        "--fixed-k",
        action="store_true",
        help="draft --k tokens every step (default: adaptive K per step, as the server runs); the accept "
        "length of a fixed K is what the trainer's learning is measured by, and lockstep runs are then "
        "deterministic",
    )
    ap.add_argument("--window", type=int, default=None, help="requests per window (plot, recovery, last window)")
    ap.add_argument("--objective", choices=("kl", "kl_rejected", "accept"), default="kl")
    ap.add_argument("--lr", type=float, default=None, help="trainer learning rate (default: TrainerConfig's)")
    ap.add_argument("--trainer-config", default=None, help="JSON object of TrainerConfig fields")
    ap.add_argument(
        "--trainer-budget",
        type=float,
        default=0.0,
        metavar="R",
        help="a modelled trainer device: before each request is admitted, wait until the trainer has "
        "trained R x the positions recorded so far (0: free-running)",
    )
    ap.add_argument(
        "--stall-seconds",
        type=float,
        default=300.0,
        help="--trainer-budget: a trainer that makes no progress this long ends the run with an error",
    )
    ap.add_argument(
        "--no-fallback-head",
        dest="fallback_head",
        action="store_false",
        help="online_static: no fallback to the static head (the engine drafts every request with the live head)",
    )
    ap.add_argument("--static-head", default=str(STATIC_HEAD), help="head of the static / online_static arms")
    ap.add_argument("--offline-head", default=None, help="head of the offline arm (default: the reference head)")
    ap.add_argument("--url", default=None, help="drive a running server instead of in-process arms")
    ap.add_argument("--url-arm", default="server", help="name of the arm a --url run records")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--quick", action="store_true", help=f"a short run for tests: {QUICK}")
    ap.add_argument("--out", required=True, help="results JSON; the plot goes next to it as .png")
    ap.add_argument("--no-plot", action="store_true")
    return ap.parse_args(argv)


def validate(args) -> None:
    """Fill defaults and check everything before loading a model; UsageError is one line."""
    from aurora_sgl import reference_head_path

    for name, default in (("requests_per_phase", 160), ("max_tokens", 96), ("window", 32)):
        if getattr(args, name) is None:
            setattr(args, name, QUICK[name] if args.quick else default)
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown or not args.arms:
        raise UsageError(f"unknown arm {', '.join(unknown) or '(none given)'}; arms are {', '.join(ARMS)}")
    if args.url:
        args.arms = [args.url_arm]
        if not args.fallback_head:
            raise UsageError("--no-fallback-head is for in-process arms; a server's own --fallback-head decides")
    paths = [Path(p.strip()) for p in args.stream.split(",") if p.strip()] if args.stream else DEFAULT_STREAM
    for p in paths:
        if not p.is_file():
            raise UsageError(f"stream file not found: {p}")
    args.stream_paths = paths
    for name in ("requests_per_phase", "max_tokens", "window", "concurrency", "k"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.temperature <= 2:
        raise UsageError("--temperature must be in [0, 2]")
    cfg = {}
    if args.trainer_config:
        try:
            cfg = json.loads(args.trainer_config)
        except json.JSONDecodeError as e:
            raise UsageError(f"--trainer-config is not JSON: {e.msg}") from None
        if not isinstance(cfg, dict):
            raise UsageError("--trainer-config must be a JSON object")
    if args.lr is not None:
        cfg["lr"] = args.lr
    if args.trainer_budget < 0:
        raise UsageError("--trainer-budget must be >= 0")
    if args.trainer_budget and not args.url:
        cfg["position_budget"] = args.trainer_budget  # the trainer stops at the budget too
    from aurora_sgl.trainer.config import TrainerConfig  # imports torch: after the cheap checks

    try:
        TrainerConfig.from_dict(dict(cfg, objective=args.objective))
    except (TypeError, ValueError) as e:
        raise UsageError(f"--trainer-config: {e}") from None
    args.trainer_config = cfg
    args.offline_head = args.offline_head or reference_head_path()
    for arm, head in (
        ("static", args.static_head),
        ("online_static", args.static_head),
        ("offline", args.offline_head),
    ):
        if arm in args.arms and not (Path(head) / "config.json").is_file():
            raise UsageError(f"the {arm} arm's head {head} has no config.json")
    out = Path(args.out)
    if out.parent and not out.parent.is_dir():
        raise UsageError(f"--out folder {out.parent} does not exist")


def _commit() -> str | None:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        validate(args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import AutoTokenizer

    from aurora_sgl import reference_model_path
    from aurora_sgl.training.prompts import PromptFileError, load_prompt_rows

    torch.set_num_threads(1)  # the trainer sidecar gets the other core
    tokenizer = AutoTokenizer.from_pretrained(reference_model_path())
    try:
        domains = [(domain_name(p), load_prompt_rows(p, tokenizer)) for p in args.stream_paths]
    except PromptFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    stream = build_stream(domains, args.shift, args.requests_per_phase, args.seed)
    t0 = time.time()
    arms: dict[str, dict] = {}
    try:
        if args.url:
            arms[args.url_arm] = run_arm_url(args.url_arm, stream, args)
        else:
            from aurora_sgl.engine.target import load_hf_causal_lm

            hf = load_hf_causal_lm(reference_model_path(), "cpu", torch.float32)
            for arm in args.arms:
                arms[arm] = run_arm_inprocess(arm, stream, args, hf, tokenizer)
    except TrainerStalled as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    summary = summarize(arms, stream, args.window, args.shift)
    result = {
        "commit": _commit(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "wall_s": round(time.time() - t0, 1),
        "config": {
            "shift": args.shift,
            "stream": [str(p) for p in args.stream_paths],
            "arms": args.arms,
            "requests_per_phase": args.requests_per_phase,
            "max_tokens": args.max_tokens,
            "temperature": args.temperature,
            "seed": args.seed,
            "concurrency": args.concurrency,
            "k": args.k,
            "fixed_k": args.fixed_k,
            "fallback_head": args.fallback_head,
            "window": args.window,
            "objective": args.objective,
            "trainer_config": args.trainer_config,
            "trainer_budget": args.trainer_budget or None,
            "static_head": args.static_head,
            "offline_head": args.offline_head,
            "url": args.url,
            "quick": args.quick,
            "torch_threads": 1,
            "cpu_count": os.cpu_count(),
        },
        "unique_prompts": {d: len({r["prompt_index"] for r in stream if r["domain"] == d}) for d, _ in domains},
        "stream": [{k: r[k] for k in ("index", "phase", "domain", "prompt_index")} for r in stream],
        "summary": summary,
        "arms": arms,
    }
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    print_table(summary, arms)
    if not args.no_plot:
        png = out.with_suffix(".png")
        if plot(arms, stream, args.window, png, f"traffic shift ({args.shift}), K={args.k}, T={args.temperature}"):
            print(f"plot: {png}")
    print(f"results: {out} ({result['wall_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
