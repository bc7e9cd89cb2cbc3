"""Does a K = 0 step cost more in an engine that holds a draft head (the adaptive engine at K = 0)
than in a plain K = 0 engine? Batch-16 decode steps, 16 of speed.py's prompts, 64 tokens, the two
interleaved twice. From the root of a checkout: PYTHONPATH=. python <this file>
(at 0adebb8: k0_step_with_head.txt)."""

import statistics
import time

import torch

from aurora_sgl import reference_head_path
from aurora_sgl.engine.engine import Engine
from aurora_sgl.engine.sampling import SamplingParams
from benchmarks import speed


def main():
    torch.set_num_threads(1)
    base = Engine(num_speculative_steps=0, max_running_requests=16)
    prompts = speed.benchmark_prompts(base.tokenizer, 8)[:16]
    for label in ("plain", "k4_pinned0", "plain", "k4_pinned0"):
        k = 0 if label == "plain" else 4
        eng = Engine(
            num_speculative_steps=k,
            max_running_requests=16,
            draft_model_path=reference_head_path() if k else None,
            model=base.target.hf,
            tokenizer=base.tokenizer,
        )
        if k:
            eng.k_policy = lambda reqs: 0
        log = []
        step = eng._decode_step

        def timed(reqs, step=step, log=log):
            t0 = time.perf_counter()
            out = step(reqs)
            log.append((len(reqs), time.perf_counter() - t0))
            return out

        eng._decode_step = timed
        eng.generate(prompts, SamplingParams(max_new_tokens=64))
        b16 = [dt for b, dt in log if b == 16]
        print(f"{label} {len(b16)} median {1e3 * statistics.median(b16):.1f} ms mean {1e3 * statistics.mean(b16):.1f}")


if __name__ == "__main__":
    main()
