"""Where does fixed K = 4 lose to K = 0 at c = 16 (speed.py's prompts, 128 tokens)? Decode steps
timed by batch size, prefill chunks apart. From the root of a checkout: PYTHONPATH=. python
benchmarks/results/adaptive/explore_budget/steps_by_batch.py (at 0adebb8: steps_by_batch.txt)."""

import collections
import statistics
import time

import torch

from aurora_sgl import reference_head_path
from aurora_sgl.engine.engine import Engine
from aurora_sgl.engine.sampling import SamplingParams
from benchmarks import speed


def timed(engine, name, log):
    fn = getattr(engine, name)

    def wrap(reqs, *a, **kw):
        t0 = time.perf_counter()
        out = fn(reqs, *a, **kw)
        log.append((name, len(reqs), time.perf_counter() - t0))
        return out

    setattr(engine, name, wrap)


def main():
    torch.set_num_threads(1)
    base = Engine(num_speculative_steps=0, max_running_requests=16)
    prompts = speed.benchmark_prompts(base.tokenizer, 8)
    for k in (0, 4, 0, 4):
        head = reference_head_path() if k else None
        eng = Engine(
            num_speculative_steps=k,
            max_running_requests=16,
            draft_model_path=head,
            model=base.target.hf,
            tokenizer=base.tokenizer,
        )
        log = []
        timed(eng, "_decode_step", log)
        timed(eng, "_prefill_chunk", log)
        t0 = time.perf_counter()
        outs = eng.generate(prompts, SamplingParams(max_new_tokens=128))
        wall = time.perf_counter() - t0
        toks = sum(len(o["output_ids"]) for o in outs)
        decode = [(b, dt) for n, b, dt in log if n == "_decode_step"]
        dec = sum(dt for _, dt in decode)
        pre = sum(dt for n, _, dt in log if n == "_prefill_chunk")
        b16 = [dt for b, dt in decode if b == 16]
        tau = statistics.mean(o["meta_info"]["spec_accept_length"] for o in outs)
        print(
            f"K={k} wall {wall:.1f}s tok/s {toks / wall:.1f} decode {dec:.1f}s prefill {pre:.1f}s "
            f"other {wall - dec - pre:.1f}s steps {len(decode)} b16 steps {len(b16)} "
            f"median {1e3 * statistics.median(b16) if b16 else 0:.1f}ms tau {tau:.3f}",
            flush=True,
        )
        print("   batch hist", sorted(collections.Counter(b for b, _ in decode).items()))


if __name__ == "__main__":
    main()
