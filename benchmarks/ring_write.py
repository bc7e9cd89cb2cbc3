"""Signal-ring write cost per engine step: the per-record path vs the batched path (issue 13 item 7).

    python benchmarks/ring_write.py --out benchmarks/results/ring_write/ring_write.json [--reps 200]

One step's records for batch 1, 8 and 48 (K = 5, rows 1..K+1 at random, hidden 512, aux 3 x 512,
float32, a CPU ring of 512 slots, so batches wrap), written three ways, interleaved, in one run:
  per_record   the path batching replaced (`SignalRing._write_each`): seven slot copies per record;
  write_many   `StepRecord`s as the embedded engine emits them (views into its batch tensors),
               stacked into one `RecordBatch` (one gather per field), then `write_batch`;
  write_batch  a prebuilt `RecordBatch`, as the SGLang drain passes its staging slot.
Figures: median per-step time (us) and the ratios per_record / write_many and per_record / write_batch.
CPU only here: on a GPU the per-record path also pays one kernel launch per field per record (and a
pageable device->host copy each for a host ring), which these ratios do not include.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from aurora_sgl.records import StepRecord, chain_outcome  # noqa: E402
from aurora_sgl.transport.signal_ring import SignalRing, stack_records  # noqa: E402

K, HIDDEN = 5, 512
AUX = 3 * HIDDEN


def step_records(bs: int, g: torch.Generator) -> list[StepRecord]:
    """One decode step's records, views into [bs, K+1, ...] batch tensors like the engine's."""
    tokens = torch.randint(0, 1000, (bs, K + 1), generator=g)
    nxt = torch.randint(0, 1000, (bs, K + 1), generator=g)
    aux = torch.randn(bs, K + 1, AUX, generator=g)
    final = torch.randn(bs, K + 1, HIDDEN, generator=g)
    drafts = torch.randint(0, 1000, (bs, K), generator=g)
    acc = torch.randint(0, K + 1, (bs,), generator=g).tolist()
    return [
        StepRecord(
            request_id=f"request-{i:04d}",
            position=100 + i,
            draft_tokens=drafts[i],
            target_tokens=torch.where(chain_outcome(K, a) >= 0, nxt[i, :K], -1),
            outcome=chain_outcome(K, a),
            num_accepted=a,
            committed=[],
            input_tokens=tokens[i, : a + 1],
            next_tokens=nxt[i, : a + 1],
            aux_hidden=aux[i, : a + 1],
            final_hidden=final[i, : a + 1],
            draft_version=1,
        )
        for i, a in enumerate(acc)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 48])
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    ring = SignalRing.create("aurora_bench_ring", 512, K + 1, AUX, HIDDEN, K)
    result = {"k": K, "hidden": HIDDEN, "aux": AUX, "ring_slots": ring.capacity, "reps": args.reps, "batches": {}}
    t_start = time.perf_counter()
    try:
        for bs in args.batches:
            recs = step_records(bs, g)
            batch = stack_records(recs, ring.max_tokens)
            paths = {
                "per_record": lambda r=recs: ring._write_each(r),
                "write_many": lambda r=recs: ring.write_many(r),
                "write_batch": lambda b=batch: ring.write_batch(b),
            }
            times = {name: [] for name in paths}
            for fn in paths.values():  # warm-up
                fn()
            for _ in range(args.reps):  # interleaved: the machine's noise hits every path alike
                for name, fn in paths.items():
                    t0 = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - t0)
            med = {name: statistics.median(v) * 1e6 for name, v in times.items()}
            result["batches"][str(bs)] = {
                "median_us": {name: round(v, 1) for name, v in med.items()},
                "per_record_over_write_many": round(med["per_record"] / med["write_many"], 2),
                "per_record_over_write_batch": round(med["per_record"] / med["write_batch"], 2),
            }
            print(f"batch {bs:3d}: " + "  ".join(f"{n} {v:8.1f} us" for n, v in med.items()), flush=True)
    finally:
        ring.close()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    result["commit"] = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent
    ).stdout.strip()
    print(json.dumps(result, indent=2))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
