"""Offline draft-head training: the target generates continuations of a prompt file, and the head
learns them with the TTT unroll. Batches and the train step it shares with the online
trainer are in `training.batches`.

    python -m aurora_sgl.offline_train --prompts prompts.jsonl --out heads/code [--model-path M]
"""

from __future__ import annotations

import argparse
import random
import sys
import time

import torch

from aurora_sgl.engine.draft_head import Eagle3Config, Eagle3Head
from aurora_sgl.training.batches import HeadBatch, Sequence, draft_vocab_from_counts, train_step
from aurora_sgl.training.losses import OBJECTIVES


@torch.no_grad()
def featurize(model, aux_layer_ids: list[int], token_lists: list[list[int]], prompt_lens: list[int]) -> list[Sequence]:
    """One plain transformers forward per sequence: aux layers' outputs and the final hidden."""
    seqs = []
    for ids, plen in zip(token_lists, prompt_lens):
        out = model(torch.tensor([ids]), output_hidden_states=True)
        hs = out.hidden_states  # embeddings, then each layer's output; the last one is normed
        aux = torch.cat([hs[i + 1][0] for i in aux_layer_ids], dim=-1)
        seqs.append(Sequence(torch.tensor(ids), aux, hs[-1][0], plen))
    return seqs


def generate_sequences(
    engine, prompts: list[str], max_new_tokens: int, temperature: float = 0.0, seed: int = 0
) -> tuple[list[list[int]], list[int]]:
    from aurora_sgl.engine.sampling import SamplingParams

    params = [
        SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed + i)
        for i in range(len(prompts))
    ]
    outs = engine.generate(prompts, params)
    ids = [engine.encode(p) for p in prompts]
    return [p + _without_stop_token(o) for p, o in zip(ids, outs)], [len(p) for p in ids]


def _without_stop_token(out: dict) -> list[int]:
    """The output ids up to a matched stop token (EOS), which output_ids keeps as SGLang does: the
    sequences (and the heads trained on them) stay what they were before it was kept."""
    meta = out["meta_info"]
    ended = meta["finish_reason"] == "stop" and isinstance(meta["matched_stop"], int)
    return out["output_ids"][:-1] if ended else out["output_ids"]


def train_head_offline(
    engine,
    prompts: list[str],
    *,
    max_new_tokens: int = 128,
    steps: int = 400,
    batch_size: int = 8,
    lr: float = 1e-3,
    unroll: int = 5,
    objective: str = "kl",
    draft_vocab_size: int | None = None,
    max_len: int = 384,
    seed: int = 0,
    temperature: float = 0.0,
    log=print,
) -> tuple[Eagle3Head, dict]:
    """Train `engine.head`'s shape from scratch on the target's continuations of `prompts`."""
    torch.manual_seed(seed)
    t0 = time.time()
    tokens, plens = generate_sequences(engine, prompts, max_new_tokens, temperature, seed)
    # Keep the tail of long sequences: the generated part and the context right before it.
    trimmed = []
    for ids, plen in zip(tokens, plens):
        cut = max(0, len(ids) - max_len)
        trimmed.append((ids[cut:], max(1, plen - cut)))
    hf = engine.target.hf
    seqs = featurize(hf, engine.target.aux_layer_ids, [t for t, _ in trimmed], [p for _, p in trimmed])
    gen_time = time.time() - t0
    vocab = engine.target.vocab_size
    cfg = Eagle3Config.for_target(
        hf.config, draft_vocab_size or engine.head.config.draft_vocab_size, engine.target.aux_layer_ids
    )
    head = Eagle3Head(cfg, hf.get_input_embeddings())
    head.reset_parameters(seed)
    counts = torch.zeros(vocab)
    for s in seqs:
        counts.index_add_(0, s.tokens[s.first_generated :], torch.ones(len(s.tokens) - s.first_generated))
    head.set_draft_vocab(draft_vocab_from_counts(counts, cfg.draft_vocab_size))
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    lm_w = hf.lm_head.weight.detach()
    stats = {}
    for step in range(steps):
        for g in opt.param_groups:  # short warmup then constant, like the online trainer
            g["lr"] = lr * min(1.0, (step + 1) / 20)
        batch = HeadBatch.from_sequences(rng.sample(seqs, min(batch_size, len(seqs))))
        stats = train_step(head, opt, lm_w, batch, unroll, objective)
        if step % 50 == 0 or step == steps - 1:
            log(
                f"step {step}/{steps} loss {stats['loss']:.3f} top1/step "
                + " ".join(f"{a:.2f}" for a in stats["step_top1"])
            )
    info = {
        "sequences": len(seqs),
        "generation_s": round(gen_time, 1),
        "train_s": round(time.time() - t0 - gen_time, 1),
        "final_loss": stats.get("loss"),
        "final_top1_per_step": stats.get("step_top1"),
    }
    return head.eval(), info


def main(argv=None) -> int:
    from aurora_sgl.engine.engine import Engine
    from aurora_sgl.training.prompts import PromptFileError, load_prompts

    ap = argparse.ArgumentParser(prog="python -m aurora_sgl.offline_train", description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", required=True, help="JSONL (prompt / messages / dataset fields) or a text file")
    ap.add_argument("--out", required=True, help="output directory (EAGLE-3 checkpoint layout)")
    ap.add_argument("--model-path", default=None, help="target model (default: the built-in reference model)")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--unroll", type=int, default=5)
    ap.add_argument("--objective", choices=OBJECTIVES, default="kl")
    ap.add_argument("--draft-vocab-size", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    engine = Engine(args.model_path, num_speculative_steps=0, max_running_requests=16)
    try:
        prompts = load_prompts(args.prompts, engine.tokenizer, limit=args.num_prompts)
    except PromptFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    head, info = train_head_offline(
        engine,
        prompts,
        max_new_tokens=args.max_new_tokens,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        unroll=args.unroll,
        objective=args.objective,
        draft_vocab_size=args.draft_vocab_size,
        seed=args.seed,
        temperature=args.temperature,
    )
    head.save(args.out)
    print(f"saved {args.out}: {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
