"""Offline check of the fallback head's choice (aurora_sgl/engine/head_choice.py): does a head's
simulated accept length over a request's newest positions -- the prompt's end, plus its first
generated tokens -- pick the head that drafts the request best?

Two fixed heads (the reference code and general heads), each playing the live one in turn; every
prompt is drafted by each head alone (fixed K, greedy) for its realized accept length, and scored
by each head as the engine scores it. Tuning domains (HumanEval, MT-Bench, GSM8K test) choose the
settings; check domains (benchmarks/streams: held-out code, chat second turns, prose, math) judge.

    R=benchmarks/results/traffic_shift_fallback
    python benchmarks/head_choice_offline.py --generated 16 --out $R/offline_g16.json   # ~2 min
    python benchmarks/head_choice_offline.py --generated 0 --out $R/offline_g0.json     # the prompt's end only
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common.paths import datasets_dir  # noqa: E402

DATA, STREAMS = datasets_dir(), REPO / "benchmarks" / "streams"
TUNING = {
    "humaneval": DATA / "humaneval" / "HumanEval.jsonl.gz",
    "mt_bench": DATA / "mt_bench" / "question.jsonl",
    "gsm8k": DATA / "gsm8k" / "test.jsonl",
}
CHECK = {
    "code_heldout": STREAMS / "code_heldout.jsonl",
    "chat_turn2": STREAMS / "chat_turn2.jsonl",
    "prose_heldout": STREAMS / "prose_heldout.jsonl",
    "math_heldout": STREAMS / "math_heldout.jsonl",
}
HEADS = {
    "code": REPO / "aurora_sgl" / "reference_heads" / "code",
    "general": REPO / "aurora_sgl" / "reference_heads" / "general",
}
MARGINS = (0.0, 0.02, 0.05, 0.1)


def score(engine, head, prompt: list[int], generated: list[int]) -> float:
    """The engine's measure, through the engine's own evidence: with no generated tokens, the
    prefill choice's (the head over the prompt's newest SCORE_POSITIONS rows); with some, the final
    choice's (drafts from the generated rows only, after SCORE_CONTEXT rows of context). Each row's
    target token is the target's greedy choice (the output's own tokens, at T = 0)."""
    import torch

    from aurora_sgl.engine.head_choice import SCORE_STEPS, HeadEvidence, head_score

    ids = prompt + generated
    t = len(ids)
    with torch.no_grad():
        out = engine.target.forward(torch.tensor([ids]), torch.arange(t)[None], torch.tensor([0]))
    evidence = HeadEvidence()
    evidence.add(out.aux_hidden[0, :-1], torch.tensor(ids[1:]), 0, out.logits[0, :-1].argmax(-1))
    rows = evidence.score_rows(first_start=len(prompt) - 1 if generated else None)
    return head_score(head, *rows, SCORE_STEPS)


def run(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from aurora_sgl import reference_model_path
    from aurora_sgl.engine.engine import Engine
    from aurora_sgl.engine.sampling import SamplingParams
    from aurora_sgl.engine.target import load_hf_causal_lm
    from aurora_sgl.training.prompts import load_prompt_rows

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(reference_model_path())
    hf = load_hf_causal_lm(reference_model_path(), "cpu", torch.float32)
    rng = random.Random(args.seed)
    prompts = []  # (set, domain, prompt)
    for name, domains in (("tuning", TUNING), ("check", CHECK)):
        for domain, path in domains.items():
            rows = load_prompt_rows(path, tok)
            rng.shuffle(rows)
            prompts += [(name, domain, r["prompt"]) for r in rows[: args.per_domain]]
    texts = [p for _, _, p in prompts]
    sp = SamplingParams(max_new_tokens=args.max_tokens, temperature=0.0)
    plain = Engine(num_speculative_steps=0, max_running_requests=8, model=hf, tokenizer=tok)
    outputs = [o["output_ids"] for o in plain.generate(texts, sp)]
    per_head = {}
    for name, path in HEADS.items():
        eng = Engine(
            num_speculative_steps=args.k, max_running_requests=8, draft_model_path=str(path), model=hf, tokenizer=tok
        )
        taus = [o["meta_info"]["spec_accept_length"] for o in eng.generate(texts, sp)]
        scores = [score(eng, eng.head, eng.encode(p), out[: args.generated]) for p, out in zip(texts, outputs)]
        per_head[name] = {"accept_length": taus, "score": scores}
    return {"prompts": [{"set": s, "domain": d} for s, d, _ in prompts], "heads": per_head}


def summarize(raw: dict) -> dict:
    from aurora_sgl.engine.head_choice import choose_head

    names = list(HEADS)
    rows = raw["prompts"]
    out = {}
    for set_name in ("tuning", "check"):
        idx = [i for i, r in enumerate(rows) if r["set"] == set_name]
        tau = {h: [raw["heads"][h]["accept_length"][i] for i in idx] for h in names}
        fig = {f"{h}_alone": round(statistics.fmean(tau[h]), 3) for h in names}
        fig["oracle_per_request"] = round(statistics.fmean(max(tau[h][j] for h in names) for j in range(len(idx))), 3)
        for live in names:
            order = [live] + [h for h in names if h != live]  # index 0: the live head
            for m in MARGINS:
                picked = [
                    raw["heads"][order[choose_head([raw["heads"][h]["score"][i] for h in order], m)]]["accept_length"][
                        i
                    ]
                    for i in idx
                ]
                fig[f"picked_live_{live}_margin_{m}"] = round(statistics.fmean(picked), 3)
        out[set_name] = fig
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-domain", type=int, default=16, help="prompts per domain")
    ap.add_argument(
        "--generated", type=int, default=16, help="generated tokens that join the scored rows (0: prompt only)"
    )
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    if args.per_domain < 1 or args.generated < 0 or args.max_tokens < 1 or args.k < 1:
        print("error: --per-domain, --max-tokens and --k must be positive; --generated >= 0", file=sys.stderr)
        return 2
    raw = run(args)
    summary = summarize(raw)
    result = {"config": vars(args), "summary": summary, **raw}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    for set_name, fig in summary.items():
        print(f"== {set_name}")
        for key, value in fig.items():
            print(f"  {key:>36}: {value}")
    print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
