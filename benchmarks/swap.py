"""Hot-swap pause and recording overhead under load, on the reference model.

    python benchmarks/swap.py --out benchmarks/results/swap.json [--swaps 1000]

The engine serves `--concurrency` greedy requests continuously (K = 4, the offline head) with the
flywheel attached: every step's records go to a real signal ring, and a separate publisher process
(standing in for the trainer) publishes a new version into the weight store every few
milliseconds, so nearly every step swaps. Measured in the one run:
  swap pause   time between two steps spent swapping (poll, finiteness + checksum check, in-place
               copy into the live parameters), per swap: p50 / p99 / max;
  recording    time spent writing step records into the ring, as a fraction of step time.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
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
from aurora_sgl.online.flywheel import Flywheel  # noqa: E402
from aurora_sgl.transport.signal_ring import SignalRing  # noqa: E402
from aurora_sgl.transport.weight_store import WeightStore, layout_of  # noqa: E402

PROMPTS = [
    "def parse(line):\n",
    "Question: A farmer has 12 cows and buys 7 more. How many cows?\nAnswer:",
    "KING LEAR:\n",
    "import re\n\n\ndef tokens(text):\n",
]


def publisher(spec: dict, state: dict, interval_s: float, stop) -> None:
    torch.set_num_threads(1)
    store = WeightStore.attach(spec)
    alt = {k: (v + 1e-3 if v.is_floating_point() else v) for k, v in state.items()}
    i = 0
    while not stop.is_set():
        store.publish(alt if i % 2 else state)
        i += 1
        time.sleep(interval_s)
    store.close()


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--swaps", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--publish-interval-ms", type=float, default=5.0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    engine = Engine(
        num_speculative_steps=4, draft_model_path=reference_head_path(), max_running_requests=args.concurrency
    )
    h = engine.target.config.hidden_size
    ring = SignalRing.create("aurora_bench_ring", 4096, 8, 3 * h, h, engine.k)
    store = WeightStore.create("aurora_bench_store", layout_of(engine.head.serving_state()))
    flywheel = Flywheel(engine, ring, store, window=10**9)  # judge nothing: measure swaps only

    write_time = [0.0]
    write_many = ring.write_many

    def timed_write(records):
        t0 = time.perf_counter()
        write_many(records)
        write_time[0] += time.perf_counter() - t0

    ring.write_many = timed_write

    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    state = {k: v.clone() for k, v in engine.head.serving_state().items()}
    proc = ctx.Process(target=publisher, args=(store.spec(), state, args.publish_interval_ms / 1e3, stop))
    proc.start()
    step_time = 0.0
    steps = 0
    tokens = 0
    t_start = time.perf_counter()
    try:
        reqs = []
        while flywheel.swaps < args.swaps:
            reqs = [r for r in reqs if not r.finished]
            while len(reqs) < args.concurrency:
                reqs.append(
                    engine.add_request(
                        PROMPTS[len(reqs) % len(PROMPTS)], SamplingParams(max_new_tokens=96, ignore_eos=True)
                    )
                )
            t0 = time.perf_counter()
            records = engine.step()
            step_time += time.perf_counter() - t0
            steps += 1
            tokens += sum(len(r.committed) for r in records)
    finally:
        stop.set()
        proc.join(timeout=10)
        ring.close()
        store.close()
    pauses_ms = [p * 1e3 for p in flywheel.swap_pauses]
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    result = {
        "commit": commit,
        "swaps": flywheel.swaps,
        "steps": steps,
        "concurrency": args.concurrency,
        "threads": args.threads,
        "refused": flywheel.refused,
        "failed_copies": flywheel.failed_copies,
        "swap_pause_ms_p50": round(statistics.median(pauses_ms), 4),
        "swap_pause_ms_p99": round(percentile(pauses_ms, 0.99), 4),
        "swap_pause_ms_max": round(max(pauses_ms), 4),
        "recording_overhead_frac": round(write_time[0] / step_time, 4),
        "mean_step_ms": round(step_time / steps * 1e3, 3),
        "tokens_per_s": round(tokens / (time.perf_counter() - t_start), 1),
        "head_parameters": sum(v.numel() for v in state.values() if v.is_floating_point()),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
