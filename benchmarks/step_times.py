"""Decode-step times by batch size, for the adaptive-K cost questions of benchmarks/README.md
("Exploration from a time budget"). Two interleaved experiments, one thread, speed.py's prompts:

    python benchmarks/step_times.py --out benchmarks/results/adaptive/explore_budget/step_times.json

  closed_loop  24 prompts, 128 tokens, c = 16, fixed K = 0 and K = 4 (twice each): every decode step
               timed with its batch size, prefill chunks apart -- what a K = 4 step costs at batch 16
               against K = 0, and how many steps each runs below batch 16 as requests finish.
  pinned_k0    16 prompts, 64 tokens: batch-16 K = 0 steps of a plain engine against an engine that
               holds a draft head with K pinned to 0 (the adaptive engine's K = 0 step).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aurora_sgl import reference_head_path  # noqa: E402
from aurora_sgl.engine.engine import Engine  # noqa: E402
from aurora_sgl.engine.sampling import SamplingParams  # noqa: E402
from benchmarks.speed import benchmark_prompts  # noqa: E402


def timed_run(engine: Engine, prompts: list[str], max_new: int) -> dict:
    """Generate with every decode step and prefill chunk timed (seconds) with its batch size."""
    log = []
    for name in ("_decode_step", "_prefill_chunk"):
        fn = getattr(engine, name)

        def wrap(reqs, *a, fn=fn, name=name, **kw):
            t0 = time.perf_counter()
            out = fn(reqs, *a, **kw)
            log.append((name, len(reqs), time.perf_counter() - t0))
            return out

        setattr(engine, name, wrap)
    t0 = time.perf_counter()
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=max_new))
    wall = time.perf_counter() - t0
    decode = [(b, dt) for n, b, dt in log if n == "_decode_step"]
    b16 = [dt for b, dt in decode if b == 16]
    return {
        "wall_s": round(wall, 3),
        "tok_s": round(sum(len(o["output_ids"]) for o in outs) / wall, 1),
        "decode_s": round(sum(dt for _, dt in decode), 3),
        "prefill_s": round(sum(dt for n, _, dt in log if n == "_prefill_chunk"), 3),
        "decode_steps": len(decode),
        "b16_steps": len(b16),
        "b16_median_ms": round(1e3 * statistics.median(b16), 2) if b16 else None,
        "accept_length": round(statistics.mean(o["meta_info"]["spec_accept_length"] for o in outs), 3),
        "steps_per_batch": dict(sorted(collections.Counter(b for b, _ in decode).items())),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    base = Engine(num_speculative_steps=0, max_running_requests=16)
    prompts = benchmark_prompts(base.tokenizer, 8)

    def engine(k: int, head: bool) -> Engine:
        return Engine(
            num_speculative_steps=k,
            max_running_requests=16,
            draft_model_path=reference_head_path() if head else None,
            model=base.target.hf,
            tokenizer=base.tokenizer,
        )

    result = {"closed_loop": [], "pinned_k0": []}
    for k in (0, 4, 0, 4):
        row = {"k": k, **timed_run(engine(k, head=k > 0), prompts, 128)}
        result["closed_loop"].append(row)
        print("closed_loop", json.dumps(row), flush=True)
    for label in ("plain", "head_pinned_k0", "plain", "head_pinned_k0"):
        eng = engine(0 if label == "plain" else 4, head=label != "plain")
        if label != "plain":
            eng.k_policy = lambda reqs: 0
        row = {"engine": label, **timed_run(eng, prompts[:16], 64)}
        result["pinned_k0"].append(row)
        print("pinned_k0", json.dumps(row), flush=True)
    result["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
