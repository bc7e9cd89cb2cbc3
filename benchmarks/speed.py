"""Decode speed on the reference model, every system measured in one run on the same prompts.

    python benchmarks/speed.py [--quick] --out benchmarks/results/speed.json

Systems: transformers `model.generate` (greedy, batch 1), our engine with K = 0 (plain decoding),
and our engine with the offline-trained head for K in {2, 4, 6}; concurrency 1, 4 and 16 (a closed
loop: all prompts submitted, at most `concurrency` running). Greedy throughout, so every system
must produce the same tokens -- checked and reported as `mismatches`.
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
from aurora_sgl.engine import Engine  # noqa: E402
from aurora_sgl.prompts import load_prompts  # noqa: E402
from aurora_sgl.sampling import SamplingParams  # noqa: E402

DATA = Path(os.environ.get("AURORA_DATASETS", Path(__file__).resolve().parents[2] / "shared" / "datasets"))


def benchmark_prompts(tokenizer, per_domain: int) -> list[str]:
    files = [DATA / "humaneval" / "HumanEval.jsonl.gz", DATA / "gsm8k" / "test.jsonl", DATA / "mt_bench" / "question.jsonl"]
    out = []
    for f in files:
        out += load_prompts(f, tokenizer, limit=per_domain)
    return out


def run_hf(model, tokenizer, prompts, max_new):
    outs, tokens = [], 0
    t0 = time.perf_counter()
    for p in prompts:
        bos = tokenizer.bos_token
        ids = tokenizer(p, return_tensors="pt", add_special_tokens=not p.startswith(bos)).input_ids
        with torch.no_grad():
            g = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        seq = g[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in seq:
            seq = seq[:seq.index(tokenizer.eos_token_id)]
        outs.append(seq)
        tokens += len(seq)
    return outs, tokens / (time.perf_counter() - t0)


def run_engine(engine, prompts, max_new, concurrency):
    engine.max_running = concurrency
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new))
    dt = time.perf_counter() - t0
    tokens = sum(len(o["output_ids"]) for o in outs)
    taus = [o["meta_info"]["spec_accept_length"] for o in outs if o["meta_info"]["spec_verify_ct"]]
    return [o["output_ids"] for o in outs], tokens / dt, (statistics.mean(taus) if taus else 1.0)


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
    draft_macs = (2 * h * (head_qd + 2 * head_kvd) + head_qd * h + 3 * h * hc.intermediate_size
                  + h * hc.draft_vocab_size)  # chained steps skip fc; the first pays it once per step
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
    return {"target_step_macs": target_macs, "draft_step_macs": draft_macs, "draft_fc_macs": fc_macs,
            "draft_over_target_flops": round((draft_macs + fc_macs) / target_macs, 4),
            "target_step_ms": round(times["target"] * 1e3, 3), "draft_step_ms": round(times["draft"] * 1e3, 3),
            "draft_over_target_time": round(times["draft"] / times["target"], 4)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few prompts and tokens (about 2 minutes)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--per-domain", type=int, default=None, help="prompts per dataset (default 8, quick 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default 128, quick 32")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for every system")
    ap.add_argument("--head", default=reference_head_path(), help="offline-trained EAGLE-3 head")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    per_domain = args.per_domain or (2 if args.quick else 8)
    max_new = args.max_new_tokens or (32 if args.quick else 128)
    ks = (2, 4) if args.quick else (2, 4, 6)
    concs = (1, 4) if args.quick else (1, 4, 16)

    base = Engine(num_speculative_steps=0, max_running_requests=16)
    prompts = benchmark_prompts(base.tokenizer, per_domain)
    rows = []
    print(f"{len(prompts)} prompts, {max_new} new tokens, {args.threads} thread(s)")
    ref, hf_tps = run_hf(base.target.hf, base.tokenizer, prompts, max_new)
    rows.append({"system": "hf_generate", "k": 0, "concurrency": 1, "tok_s": round(hf_tps, 2), "tau": 1.0, "mismatches": 0})
    engines = {0: base}
    for k in ks:
        engines[k] = Engine(num_speculative_steps=k, draft_model_path=args.head, max_running_requests=16,
                            model=base.target.hf, tokenizer=base.tokenizer)
    for k, eng in engines.items():
        for c in concs:
            outs, tps, tau = run_engine(eng, prompts, max_new, c)
            mism = sum(o != r for o, r in zip(outs, ref))
            rows.append({"system": "aurora_k0" if k == 0 else "aurora_eagle3", "k": k, "concurrency": c,
                         "tok_s": round(tps, 2), "tau": round(tau, 3), "mismatches": mism})
            print(f"  {rows[-1]}", flush=True)
    costs = step_costs(engines[ks[-1]])

    def tps(system, k, c):
        return next(r["tok_s"] for r in rows if r["system"] == system and r["k"] == k and r["concurrency"] == c)
    best_k = max(ks, key=lambda k: tps("aurora_eagle3", k, 1))
    top_c = concs[-1]
    ratios = {
        "k0_over_hf_c1": round(tps("aurora_k0", 0, 1) / hf_tps, 3),
        "spec_over_k0_c1": round(tps("aurora_eagle3", best_k, 1) / tps("aurora_k0", 0, 1), 3),
        f"k0_c{top_c}_over_hf_c1": round(tps("aurora_k0", 0, top_c) / hf_tps, 3),
        f"spec_c{top_c}_over_hf_c1": round(max(tps("aurora_eagle3", k, top_c) for k in ks) / hf_tps, 3),
    }
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    result = {"commit": commit, "quick": args.quick, "prompts": len(prompts), "max_new_tokens": max_new,
              "threads": args.threads, "best_k": best_k, "rows": rows, "ratios": ratios, "step_costs": costs,
              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"\n{'system':<14}{'k':>3}{'conc':>6}{'tok/s':>10}{'tau':>7}{'mism':>6}")
    for r in rows:
        print(f"{r['system']:<14}{r['k']:>3}{r['concurrency']:>6}{r['tok_s']:>10.1f}{r['tau']:>7.2f}{r['mismatches']:>6}")
    print("ratios:", json.dumps(ratios), "\nstep costs:", json.dumps(costs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
