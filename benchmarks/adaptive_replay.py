"""Adaptive K's acceptance estimate, judged by replaying real acceptance traces (issue 15).

Timed runs on a shared 2-core machine differ by 10 % between rounds, more than the choices being
compared, so the estimate's settings are chosen here, where only the estimate differs:
1. Serve each prompt set greedily at fixed K = K_max with a real head and record, per request and
   step, how many drafts were accepted. Greedy drafts of a shorter chain are a prefix of the same
   chain, so a step at any k <= K_max would have accepted min(a, k).
2. Replay the traces through the engine's own `AdaptiveK` at concurrency 1, 4 and 16 (one chooser
   through all three, as in speed.py), each step costing what this machine's startup calibration
   says, and through every fixed K. Ratio: committed tokens per second over the best fixed K.
3. Choose the per-request settings (prior weight, decay) on the tuning set -- speed.py's prompts --
   and report them on the check set, held-out streams (benchmarks/streams) nobody tuned on.

    python benchmarks/adaptive_replay.py --out benchmarks/results/adaptive/replay.json
    python benchmarks/adaptive_replay.py \
        --costs-from benchmarks/results/adaptive/per_request_prior4_decay0.9/speed_adaptive.json \
        --out benchmarks/results/adaptive/replay_served_costs.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from speed import DEFAULT_FILES, benchmark_prompts  # noqa: E402

from aurora_sgl import reference_head_path  # noqa: E402
from aurora_sgl.engine.adaptive import AdaptiveK, RequestAcceptance, StepCosts  # noqa: E402
from aurora_sgl.engine.engine import Engine  # noqa: E402
from aurora_sgl.engine.sampling import SamplingParams  # noqa: E402

STREAMS = REPO / "benchmarks" / "streams"
CHECK_FILES = [
    STREAMS / f for f in ("code_heldout.jsonl", "math_heldout.jsonl", "prose_heldout.jsonl", "chat_turn2.jsonl")
]
CONCURRENCY = (1, 4, 16)
PRIORS = (1.0, 2.0, 4.0, 8.0)
DECAYS = (0.7, 0.8, 0.9, 1.0)


def collect_traces(engine: Engine, prompts: list, max_new: int) -> list[list[int]]:
    """Accepted drafts per step, per request, at the engine's fixed K."""
    seqs: dict[str, list[int]] = {}

    def sink(records):
        for r in records:
            if r.num_drafted:
                seqs.setdefault(r.request_id, []).append(r.num_accepted)

    engine.record_sink = sink
    try:
        engine.generate(prompts, SamplingParams(max_new_tokens=max_new))
    finally:
        engine.record_sink = None
    return list(seqs.values())


def replay(traces: list[list[int]], costs: StepCosts, k_max: int, conc: int, max_new: int, chooser=None, fixed=None):
    """Tokens per second of one policy over the traces: `fixed` K, or `chooser` (an AdaptiveK,
    with per-request estimates unless its `request_prior` is None)."""
    queue = [{"trace": t, "step": 0, "tokens": 0, "acc": RequestAcceptance(k_max)} for t in traces]
    running, tokens, seconds = [], 0, 0.0
    while queue or running:
        while queue and len(running) < conc:
            running.append(queue.pop(0))
        b = len(running)
        per_request = chooser is not None and chooser.request_prior is not None
        requests = [q["acc"] for q in running] if per_request else None
        k = fixed if chooser is None else chooser.choose(b, 0, requests=requests)
        step_s = costs.calibrated_at(b, k)
        seconds += step_s
        accepted = []
        for q in running:
            a = min(q["trace"][q["step"] % len(q["trace"])], k)  # a longer run reuses its trace
            q["step"] += 1
            got = min(a + 1, max_new - q["tokens"])
            q["tokens"] += got
            tokens += got
            accepted.append(a)
        if chooser is not None:
            chooser.observe(b, k, step_s, accepted if k else [], requests=requests)
        running = [q for q in running if q["tokens"] < max_new]
    return tokens / seconds


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "adaptive" / "replay.json")
    ap.add_argument("--k-max", type=int, default=6)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--tune-per-domain", type=int, default=8, help="prompts per tuning file (speed.py's 8)")
    ap.add_argument("--check-per-domain", type=int, default=6, help="prompts per held-out stream file")
    ap.add_argument(
        "--costs-from",
        type=Path,
        help="a speed.py result: replay with the step costs its adaptive engine learned while serving "
        "(adaptive.step_cost.ms) instead of this machine's startup calibration",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    base = Engine(num_speculative_steps=0, max_running_requests=16)
    tok, hf = base.tokenizer, base.target.hf
    sets = {
        "tune": benchmark_prompts(tok, args.tune_per_domain, files=DEFAULT_FILES),
        "check": benchmark_prompts(tok, args.check_per_domain, files=CHECK_FILES),
    }
    heads = {"general": reference_head_path(), "code": str(Path(reference_head_path()).parent / "code")}
    if args.costs_from:  # what a served run measured, e.g. {"b1_k0": 11.5, ...} in ms
        ms = json.loads(args.costs_from.read_text())["adaptive"]["step_cost"]["ms"]
        calibrated = {tuple(int(x[1:]) for x in key.split("_")): v / 1e3 for key, v in ms.items()}
    else:  # this machine's step costs: the startup calibration of an adaptive engine at K_max
        calibrated = Engine(
            num_speculative_steps=args.k_max, max_running_requests=16, model=hf, tokenizer=tok, adaptive=True
        ).adaptive.costs.calibrated

    traces = {}
    for hname, hpath in heads.items():
        eng = Engine(
            num_speculative_steps=args.k_max, draft_model_path=hpath, max_running_requests=8, model=hf, tokenizer=tok
        )
        for sname, prompts in sets.items():
            t0 = time.perf_counter()
            traces[(hname, sname)] = collect_traces(eng, prompts, args.max_new_tokens)
            flat = [a for t in traces[(hname, sname)] for a in t]
            print(
                f"traces {hname}/{sname}: {len(prompts)} requests, tau at K = {args.k_max} "
                f"{1 + sum(flat) / len(flat):.3f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )

    variants = {"global_window": None} | {f"prior{p:g}_decay{d:g}": (p, d) for p in PRIORS for d in DECAYS}
    rows = []
    for (hname, sname), tr in traces.items():
        best = {}
        for c in CONCURRENCY:
            by_k = {
                k: replay(tr, StepCosts(calibrated), args.k_max, c, args.max_new_tokens, fixed=k)
                for k in range(args.k_max + 1)
            }
            best[c] = max(by_k, key=by_k.get), max(by_k.values())
        for name, setting in variants.items():
            prior, decay = setting if setting else (None, 1.0)
            chooser = AdaptiveK(args.k_max, StepCosts(calibrated), request_prior=prior, request_decay=decay)
            ratios = {
                c: round(
                    replay(tr, StepCosts(calibrated), args.k_max, c, args.max_new_tokens, chooser=chooser) / best[c][1],
                    4,
                )
                for c in CONCURRENCY
            }
            rows.append(
                {
                    "head": hname,
                    "set": sname,
                    "policy": name,
                    "over_best": ratios,
                    "best_k": {c: best[c][0] for c in CONCURRENCY},
                }
            )

    def mean_over(policy, sname):
        return statistics.mean(
            v for r in rows if r["policy"] == policy and r["set"] == sname for v in r["over_best"].values()
        )

    def min_over(policy, sname):
        return min(v for r in rows if r["policy"] == policy and r["set"] == sname for v in r["over_best"].values())

    summary = {
        p: {s: {"mean": round(mean_over(p, s), 4), "min": round(min_over(p, s), 4)} for s in sets} for p in variants
    }
    chosen = max((p for p in variants if p != "global_window"), key=lambda p: mean_over(p, "tune"))
    print(f"{'policy':22s} {'tune mean':>9s} {'tune min':>8s} {'check mean':>10s} {'check min':>9s}")
    for p, v in summary.items():
        t, c = v["tune"], v["check"]
        print(f"{p:22s} {t['mean']:9.3f} {t['min']:8.3f} {c['mean']:10.3f} {c['min']:9.3f}")
    print(f"best on the tuning set: {chosen}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "k_max": args.k_max,
                "max_new_tokens": args.max_new_tokens,
                "costs": str(args.costs_from) if args.costs_from else "startup calibration",
                "step_ms": {f"b{b}_k{k}": round(v * 1e3, 3) for (b, k), v in sorted(calibrated.items())},
                "tune_files": [str(f.relative_to(f.parents[1])) for f in DEFAULT_FILES],
                "check_files": [str(f.relative_to(REPO)) for f in CHECK_FILES],
                "summary": summary,
                "best_on_tuning_set": chosen,
                "rows": rows,
            },
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
