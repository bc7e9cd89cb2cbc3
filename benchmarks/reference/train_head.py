"""Train the offline ("static") EAGLE-3 head for the reference model and ship it with the package.

    python benchmarks/reference/train_head.py            # about 10 min on 2 cores
    python benchmarks/reference/train_head.py --domains code --steps 300 \
        --out aurora_sgl/reference_heads/code            # the code-only head of the traffic-shift benchmark

Prompts come from the reference model's own *training* domains (standard-library code, GSM8K train
questions, Shakespeare, docstring chats) -- never from HumanEval, MT-Bench or GSM8K test, which the
benchmarks stream. The target writes the continuations; the head learns them with the TTT unroll.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
from corpus import ASSISTANT, BOS, EOS, USER, load_corpus  # noqa: E402
from train_target import DEFAULT_DATA  # noqa: E402

from aurora_sgl import reference_head_path  # noqa: E402
from aurora_sgl.engine.engine import Engine  # noqa: E402
from aurora_sgl.training.offline import train_head_offline  # noqa: E402


def domain_prompts(data_dir: Path, per_domain: int, seed: int) -> dict[str, list[str]]:
    corpus = load_corpus(data_dir, seed)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {}
    # code: a def line plus its docstring, as a completion prompt
    defs = []
    for doc in corpus["code"].train:
        defs += re.findall(r'\n(    def \w+\(.*?\):\n        """.*?"""\n|def \w+\(.*?\):\n    """.*?"""\n)', doc, re.S)
    defs = [d.lstrip("\n") for d in defs if len(d) < 800]  # the lazy match can still span functions
    out["code"] = rng.sample(defs, per_domain)
    # math: the question part of GSM8K train samples, in both trained formats
    math = []
    for s in rng.sample(corpus["math"].train, per_domain):
        body = s.replace(BOS, "").replace(EOS, "")
        if body.startswith("Question:"):
            math.append(body.split("\nAnswer:")[0] + "\nAnswer:")
        else:
            math.append(BOS + body.split(ASSISTANT)[0] + ASSISTANT + "\n")
    out["math"] = math
    # prose: the first speech of a Shakespeare passage, and docstring questions as chat
    prose = []
    for s in rng.sample(corpus["shakespeare"].train, per_domain // 2):
        prose.append(s.replace(BOS, "").split("\n\n")[0] + "\n\n")
    for s in rng.sample([d for d in corpus["docs"].train if USER in d], per_domain - per_domain // 2):
        prose.append(s.split(ASSISTANT)[0] + ASSISTANT + "\n")
    out["prose"] = prose
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--out", type=Path, default=Path(reference_head_path()))
    ap.add_argument("--per-domain", type=int, default=80)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--domains",
        default="code,math,prose",
        help="comma-separated subset of code, math, prose (e.g. 'code' for a code-only head)",
    )
    args = ap.parse_args(argv)
    domains = [d.strip() for d in args.domains.split(",") if d.strip()]
    if not domains or set(domains) - {"code", "math", "prose"}:
        print(f"error: --domains takes a subset of code, math, prose, got {args.domains!r}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    try:
        prompts = domain_prompts(args.data_dir, args.per_domain, args.seed)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    engine = Engine(num_speculative_steps=0, max_running_requests=16)
    flat = [p for d in domains for p in prompts[d]]
    # Chat prompts already carry the BOS text; plain ones get it from the tokenizer.
    head, info = train_head_offline(
        engine,
        flat,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        batch_size=8,
        lr=1e-3,
        unroll=5,
        seed=args.seed,
    )
    head.save(args.out)
    info.update(
        domains=domains,
        per_domain=args.per_domain,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        seed=args.seed,
    )
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
