"""Offline draft-head training: the target generates continuations of a prompt file, and the head
learns them with the TTT unroll. The online trainer reuses `HeadBatch`, `train_step` and
`draft_vocab_from_counts`.

    python -m aurora_sgl.offline_train --prompts prompts.jsonl --out heads/code [--model-path M]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

import torch

from aurora_sgl.engine.draft_head import Eagle3Config, Eagle3Head
from aurora_sgl.training.losses import OBJECTIVES, draft_loss, ttt_logits


@dataclass
class Sequence:
    tokens: torch.Tensor  # [T]
    aux: torch.Tensor  # [T, 3H]
    final: torch.Tensor  # [T, H]
    first_generated: int  # index of the first generated token


@dataclass
class HeadBatch:
    """Padded training batch in the alignment `losses` expects (see its docstring)."""

    aux: torch.Tensor  # [B, T-1, 3H]
    next_tokens: torch.Tensor  # [B, T-1]
    final_next: torch.Tensor  # [B, T-1, H] final hidden at t+1: lm_head of it = target for x_{t+2}
    mask: torch.Tensor  # [B, T-1] the predicted token x_{t+2} is generated (and not padding)
    position_weight: torch.Tensor | None = None

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], weights: list[torch.Tensor] | None = None) -> HeadBatch:
        t = max(len(s.tokens) for s in seqs) - 1
        b = len(seqs)
        aux = seqs[0].aux.new_zeros(b, t, seqs[0].aux.shape[-1])
        fin = seqs[0].final.new_zeros(b, t, seqs[0].final.shape[-1])
        nxt = torch.zeros(b, t, dtype=torch.long)
        mask = torch.zeros(b, t, dtype=torch.bool)
        pw = torch.ones(b, t) if weights is not None else None
        for i, s in enumerate(seqs):
            n = len(s.tokens) - 1
            aux[i, :n] = s.aux[:n]
            fin[i, :n] = s.final[1:]
            nxt[i, :n] = s.tokens[1:]
            pos = torch.arange(n)
            mask[i, :n] = (pos + 2 >= s.first_generated) & (pos + 1 < n)
            if weights is not None:  # weights[i][j] weighs the prediction of token j (= t + 2)
                pw[i, : n - 1] = weights[i][2 : n + 1]
        return cls(aux, nxt, fin, mask, pw)


def draft_vocab_from_counts(counts: torch.Tensor, size: int) -> torch.Tensor:
    """Most frequent target tokens (ties broken by lower id, which BPE orders by frequency)."""
    score = counts.double() - torch.arange(counts.numel(), dtype=torch.float64) * 1e-9
    return score.topk(size).indices.sort().values


def train_step(
    head: Eagle3Head,
    opt: torch.optim.Optimizer,
    lm_head_weight: torch.Tensor,
    batch: HeadBatch,
    unroll: int,
    objective: str = "kl",
    clip: float = 2.5,
) -> dict:
    head.train()
    target_logits = batch.final_next @ lm_head_weight.T
    logits = ttt_logits(head, batch.aux, batch.next_tokens, unroll)
    loss, stats = draft_loss(
        logits, target_logits, head.hot_ids, batch.mask, objective, position_weight=batch.position_weight
    )
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), clip)
    finite = bool(torch.isfinite(grad_norm))
    if finite:
        opt.step()
    head.eval()
    stats.update(loss=loss.item(), grad_norm=grad_norm.item(), skipped=not finite)
    return stats


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
    return [p + o["output_ids"] for p, o in zip(ids, outs)], [len(p) for p in ids]


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
