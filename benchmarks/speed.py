"""Decode speed on the reference model, every system measured in one run on the same prompts.

    python benchmarks/speed.py [--quick] --out benchmarks/results/speed.json

Systems, all greedy on the same prompts and max tokens:
  transformers `generate`, batch 1: plain (`hf_generate`), assisted generation with a small draft
    LM sharing the tokenizer (`hf_assisted`, benchmarks/reference/draft_lm), prompt-lookup decoding
    (`hf_prompt_lookup`);
  our engine, in process, concurrency 1 / 4 / 16 (closed loop: all prompts submitted, at most
    `concurrency` running): K = 0 (`aurora_k0`), the offline head at K in {2, 4, 6}
    (`aurora_eagle3`), the offline head with K chosen per step up to the largest K
    (`aurora_adaptive`; `adaptive_over_best_c*` divides it by the best of K = 0 and every fixed K
    at that concurrency), and the online head (`aurora_online`, K = 4: the trainer sidecar learns
    from a warm-up of requests from the same datasets, then the head is measured frozen);
  the real HTTP server (`python -m aurora_sgl.launch_server`, streaming /generate) at K = 0 and
    K = 4 (adaptive, the launch default): TTFT and time per output token, p50 / p99, concurrency 1 / 4 / 16.
Every system's tokens are compared with plain transformers greedy (`mismatches`, expected 0).
With `--rounds R` every system is measured R times, interleaved; tok/s is the median.
Also measured: one draft-head step vs one target step, in FLOPs and in CPU time (batch 1).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aurora_sgl import reference_head_path, reference_model_path  # noqa: E402
from aurora_sgl.engine.engine import Engine  # noqa: E402
from aurora_sgl.engine.sampling import SamplingParams  # noqa: E402
from aurora_sgl.training.prompts import PromptFileError, load_prompts  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_peers import assisted_settings, load_draft_lm, run_hf, warm_up_online  # noqa: E402
from speed_server import Server, measure  # noqa: E402

DRAFT_LM = Path(__file__).resolve().parent / "reference" / "draft_lm"

from benchmarks.common.paths import datasets_dir  # noqa: E402

DATA = datasets_dir()


DEFAULT_FILES = [
    DATA / "humaneval" / "HumanEval.jsonl.gz",
    DATA / "gsm8k" / "test.jsonl",
    DATA / "mt_bench" / "question.jsonl",
]


def benchmark_prompts(tokenizer, per_domain: int, skip: int = 0, files: list[Path] | None = None) -> list[str]:
    """`per_domain` prompts from each file (default: the three datasets), after its first `skip`
    (the warm-up takes later ones)."""
    files = files or DEFAULT_FILES
    out = []
    for f in files:
        out += load_prompts(f, tokenizer, limit=skip + per_domain)[skip:]
    return out


def run_engine(engine, prompts, max_new, concurrency):
    engine.max_running = concurrency
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new))
    dt = time.perf_counter() - t0
    tokens = sum(len(o["output_ids"]) for o in outs)
    taus = [o["meta_info"]["spec_accept_length"] for o in outs if o["meta_info"]["spec_verify_ct"]]
    return {
        "outputs": [o["output_ids"] for o in outs],
        "tok_s": tokens / dt,
        "tau": statistics.mean(taus) if taus else 1.0,
    }


def step_costs(engine, reps: int = 200) -> dict:
    """FLOPs (multiply-adds, weights only) and measured CPU time of one target decode step vs one
    draft-head step, batch 1, at a 256-token context."""
    cfg = engine.target.config
    hc = engine.head.config
    h, i, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kvd = engine.target.kv_heads * engine.target.head_dim
    qd = engine.target.heads * engine.target.head_dim
    target_macs = layers * (h * (qd + 2 * kvd) + qd * h + 3 * h * i) + h * cfg.vocab_size
    head_kvd = hc.num_key_value_heads * hc.head_dim
    head_qd = hc.num_attention_heads * hc.head_dim
    draft_macs = (
        2 * h * (head_qd + 2 * head_kvd) + head_qd * h + 3 * h * hc.intermediate_size + h * hc.draft_vocab_size
    )  # chained steps skip fc; the first pays it once per step
    fc_macs = len(hc.aux_layer_ids) * hc.target_hidden_size * h
    slots = torch.zeros(1, dtype=torch.long)
    pos = torch.tensor([[256]])
    tok = torch.tensor([[5]])
    hid = torch.randn(1, 1, h)
    with torch.no_grad():

        def t_target():
            engine.target.forward(tok, pos, slots, (0, 1))

        def t_draft():
            engine.head.logits(engine.head.forward_cached(hid, tok, pos, engine.head_k, engine.head_v, slots, (0, 1)))

        times = {}
        for name, fn in (("target", t_target), ("draft", t_draft)):
            for _ in range(20):
                fn()
            samples = []
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
            times[name] = statistics.median(samples)
    return {
        "target_step_macs": target_macs,
        "draft_step_macs": draft_macs,
        "draft_fc_macs": fc_macs,
        "draft_over_target_flops": round((draft_macs + fc_macs) / target_macs, 4),
        "target_step_ms": round(times["target"] * 1e3, 3),
        "draft_step_ms": round(times["draft"] * 1e3, 3),
        "draft_over_target_time": round(times["draft"] / times["target"], 4),
    }


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="a few prompts and tokens (under a minute; what the test runs)"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--stream",
        default=None,
        help="comma-separated prompt files replacing the datasets (HumanEval, GSM8K test, MT-Bench)",
    )
    ap.add_argument("--per-domain", type=int, default=None, help="prompts per dataset (default 8, quick 1)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128, quick 16")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every system (servers too)")
    ap.add_argument("--head", default=reference_head_path(), help="offline-trained EAGLE-3 head")
    ap.add_argument(
        "--draft-lm", type=Path, default=DRAFT_LM, help="assistant model for transformers' assisted generation"
    )
    ap.add_argument("--prompt-lookup-tokens", type=int, default=10, help="transformers' prompt_lookup_num_tokens")
    ap.add_argument(
        "--online-warmup",
        type=int,
        default=None,
        help="warm-up requests for the online head, from the same datasets (default 96, quick 3)",
    )
    ap.add_argument("--rounds", type=int, default=1, help="measure every system this many times, interleaved")
    args = ap.parse_args(argv)
    for name in ("per_domain", "max_new_tokens", "online_warmup", "rounds", "threads", "prompt_lookup_tokens"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "online_warmup" else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not (args.draft_lm / "config.json").is_file():
        ap.error(
            f"--draft-lm {args.draft_lm} has no config.json (train it: python benchmarks/reference/train_draft_lm.py)"
        )
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # assisted generation warns about its own internal generation_config use
    torch.set_num_threads(args.threads)
    per_domain = args.per_domain or (1 if args.quick else 8)
    max_new = args.max_new_tokens or (16 if args.quick else 128)
    warmup = args.online_warmup if args.online_warmup is not None else (3 if args.quick else 96)
    ks = (4,) if args.quick else (2, 4, 6)
    concs = (1, 4, 16)
    online_k = 4

    base = Engine(num_speculative_steps=0, max_running_requests=16)
    tok, hf = base.tokenizer, base.target.hf
    try:
        files = [Path(f.strip()) for f in args.stream.split(",") if f.strip()] if args.stream else None
        prompts = benchmark_prompts(tok, per_domain, files=files)
        per_file = -(-warmup // len(files or DEFAULT_FILES))
        warm_prompts = benchmark_prompts(tok, per_file, skip=per_domain, files=files)[:warmup] if warmup else []
    except PromptFileError as e:
        print(f"error: {e} (set AURORA_DATASETS to the shared/datasets folder)", file=sys.stderr)
        return 2
    print(f"{len(prompts)} prompts, {max_new} new tokens, {args.threads} thread(s), {args.rounds} round(s)", flush=True)

    # Servers start first and load while the online head warms up; idle, they cost no CPU.
    servers = {k: Server(k, args.head, args.threads) for k in (0, online_k)}
    try:
        draft = load_draft_lm(args.draft_lm)
        engines = {0: base}
        for k in ks:
            engines[k] = Engine(
                num_speculative_steps=k, draft_model_path=args.head, max_running_requests=16, model=hf, tokenizer=tok
            )
        online_engine = Engine(
            num_speculative_steps=online_k, draft_model_path=args.head, max_running_requests=16, model=hf, tokenizer=tok
        )
        online = (
            warm_up_online(
                online_engine, warm_prompts, max_new, model_path=reference_model_path(), init_head=args.head, wave=16
            )
            if warm_prompts
            else {"warmup_requests": 0}
        )
        print(f"online head after warm-up: {online}", flush=True)
        for s in servers.values():
            s.wait_ready()
        # Adaptive K up to the largest fixed K: judged against the best of K = 0 and every fixed K.
        # Built last: its startup cost calibration must not time the servers loading or the
        # online warm-up's trainer (a server calibrates on its own machine before it serves).
        adaptive_engine = Engine(
            num_speculative_steps=max(ks),
            draft_model_path=args.head,
            max_running_requests=16,
            model=hf,
            tokenizer=tok,
            adaptive=True,
        )

        systems = [
            (("hf_generate", 0, 1), lambda: run_hf(hf, tok, prompts, max_new)),
            (("hf_assisted", 0, 1), lambda: run_hf(hf, tok, prompts, max_new, assistant_model=draft)),
            (
                ("hf_prompt_lookup", 0, 1),
                lambda: run_hf(hf, tok, prompts, max_new, prompt_lookup_num_tokens=args.prompt_lookup_tokens),
            ),
        ]
        for k, eng in engines.items():
            for c in concs:
                systems.append(
                    (
                        ("aurora_k0" if k == 0 else "aurora_eagle3", k, c),
                        lambda eng=eng, c=c: run_engine(eng, prompts, max_new, c),
                    )
                )
        for c in concs:
            systems.append(
                (("aurora_adaptive", max(ks), c), lambda c=c: run_engine(adaptive_engine, prompts, max_new, c))
            )
        for c in concs:
            systems.append((("aurora_online", online_k, c), lambda c=c: run_engine(online_engine, prompts, max_new, c)))
        for c in concs:  # K = 0 and K = 4 back to back at each concurrency
            for k, srv in servers.items():
                systems.append((("server", k, c), lambda srv=srv, c=c: measure(srv.url, prompts, max_new, c)))

        runs: dict[tuple, list[dict]] = {key: [] for key, _ in systems}
        ref = None
        for r in range(args.rounds):
            for key, fn in systems:
                res = fn()
                ref = ref if ref is not None else res["outputs"]  # plain transformers greedy, round 1
                res["mismatches"] = sum(o != g for o, g in zip(res.pop("outputs"), ref))
                runs[key].append(res)
                print(f"  round {r + 1} {key}: {res['tok_s']:.1f} tok/s, mismatches {res['mismatches']}", flush=True)
    finally:
        for s in servers.values():
            s.stop()
    costs = step_costs(engines[ks[-1]], reps=20 if args.quick else 200)
    rows = summarize_rows(runs)
    ratios = compute_ratios(rows, ks, concs, online_k)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    result = {
        "commit": commit,
        "quick": args.quick,
        "prompts": len(prompts),
        "max_new_tokens": max_new,
        "threads": args.threads,
        "rounds": args.rounds,
        "best_k": ratios.pop("_best_k"),
        "rows": rows,
        "ratios": ratios,
        "mismatches_total": sum(r["mismatches"] for r in rows),
        "hf_assisted": {
            "draft_lm": str(args.draft_lm.relative_to(Path(__file__).resolve().parents[1]))
            if args.draft_lm.resolve().is_relative_to(Path(__file__).resolve().parents[1])
            else str(args.draft_lm),
            **assisted_settings(draft),
        },
        "hf_prompt_lookup_num_tokens": args.prompt_lookup_tokens,
        "online": online,
        "adaptive": adaptive_engine.adaptive.stats(),
        "step_costs": costs,
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print_table(rows)
    print("ratios:", json.dumps(ratios), "\nstep costs:", json.dumps(costs))
    return 0


def summarize_rows(runs: dict[tuple, list[dict]]) -> list[dict]:
    """One row per system: medians over rounds; mismatches: the worst round."""
    rows = []
    for (system, k, c), results in runs.items():
        row = {
            "system": system,
            "k": k,
            "concurrency": c,
            "tok_s": round(statistics.median(x["tok_s"] for x in results), 2),
            "tau": round(statistics.median(x.get("tau", x.get("tokens_per_target_forward", 1.0)) for x in results), 3),
            "mismatches": max(x["mismatches"] for x in results),
        }
        for key in ("ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms"):
            if key in results[0]:
                row[key] = round(statistics.median(x[key] for x in results), 2)
        if len(results) > 1:
            row["tok_s_rounds"] = [round(x["tok_s"], 2) for x in results]
        rows.append(row)
    hf = next(r["tok_s"] for r in rows if r["system"] == "hf_generate")
    for row in rows:  # vs transformers greedy at c = 1, and vs our K = 0 on the same path and concurrency
        path = "server" if row["system"] == "server" else "aurora_k0"
        k0 = next(
            r["tok_s"] for r in rows if r["system"] == path and r["k"] == 0 and r["concurrency"] == row["concurrency"]
        )
        row["over_hf_c1"] = round(row["tok_s"] / hf, 3)
        row["over_k0"] = round(row["tok_s"] / k0, 3)
    return rows


def compute_ratios(rows, ks, concs, online_k) -> dict:
    def get(system, k, c, field="tok_s"):
        return next(r[field] for r in rows if r["system"] == system and r["k"] == k and r["concurrency"] == c)

    hf = get("hf_generate", 0, 1)
    k0 = get("aurora_k0", 0, 1)
    best_k = max(ks, key=lambda k: get("aurora_eagle3", k, 1))
    top_c = concs[-1]
    ratios = {
        "k0_over_hf_c1": round(k0 / hf, 3),
        "spec_over_k0_c1": round(get("aurora_eagle3", best_k, 1) / k0, 3),
        f"k0_c{top_c}_over_hf_c1": round(get("aurora_k0", 0, top_c) / hf, 3),
        f"spec_c{top_c}_over_hf_c1": round(max(get("aurora_eagle3", k, top_c) for k in ks) / hf, 3),
        "hf_assisted_over_hf_c1": round(get("hf_assisted", 0, 1) / hf, 3),
        "hf_prompt_lookup_over_hf_c1": round(get("hf_prompt_lookup", 0, 1) / hf, 3),
        "spec_over_hf_assisted_c1": round(get("aurora_eagle3", best_k, 1) / get("hf_assisted", 0, 1), 3),
        "online_over_k0_c1": round(get("aurora_online", online_k, 1) / k0, 3),
        "online_over_offline_c1": round(get("aurora_online", online_k, 1) / get("aurora_eagle3", online_k, 1), 3),
        "online_over_offline_tau": round(
            get("aurora_online", online_k, 1, "tau") / get("aurora_eagle3", online_k, 1, "tau"), 3
        ),
        "_best_k": best_k,
    }
    for c in concs:  # what speculation does to the latency a client sees, through HTTP
        ratios[f"server_tpot_p50_k{online_k}_over_k0_c{c}"] = round(
            get("server", online_k, c, "tpot_p50_ms") / get("server", 0, c, "tpot_p50_ms"), 3
        )
        ratios[f"server_ttft_p50_k{online_k}_over_k0_c{c}"] = round(
            get("server", online_k, c, "ttft_p50_ms") / get("server", 0, c, "ttft_p50_ms"), 3
        )
    ratios["server_k0_over_inprocess_k0_c1"] = round(get("server", 0, 1) / k0, 3)
    for c in concs:  # adaptive K against the best fixed choice at that concurrency, K = 0 included
        best = max([get("aurora_k0", 0, c)] + [get("aurora_eagle3", k, c) for k in ks])
        ratios[f"adaptive_over_best_c{c}"] = round(get("aurora_adaptive", max(ks), c) / best, 3)
    return ratios


def print_table(rows) -> None:
    print(
        f"\n{'system':<17}{'k':>3}{'conc':>6}{'tok/s':>10}{'tau':>7}{'mism':>6}{'x hf':>7}{'x k0':>7}"
        f"{'ttft p50':>10}{'p99':>9}{'tpot p50':>10}{'p99':>9}"
    )
    for r in rows:
        lat = "".join(
            f"{r[key]:>{w}.1f}" if key in r else " " * w
            for key, w in (("ttft_p50_ms", 10), ("ttft_p99_ms", 9), ("tpot_p50_ms", 10), ("tpot_p99_ms", 9))
        )
        print(
            f"{r['system']:<17}{r['k']:>3}{r['concurrency']:>6}{r['tok_s']:>10.1f}{r['tau']:>7.2f}{r['mismatches']:>6}"
            f"{r['over_hf_c1']:>7.2f}{r['over_k0']:>7.2f}{lat}"
        )


if __name__ == "__main__":
    sys.exit(main())
