"""Train a small draft LM for the reference model, for transformers' assisted generation
(`generate(..., assistant_model=...)`), the classic speculative-decoding peer in benchmarks/speed.py.

    python benchmarks/reference/train_draft_lm.py           # about 19 min on one core of this (shared) machine
    python benchmarks/reference/train_draft_lm.py --steps 5 --out /tmp/draft   # smoke run

A 2-layer, hidden-128 Llama with the reference model's own tokenizer (assisted generation needs the
same vocabulary), trained from scratch on the same corpus and mixture as the reference model
(reference/corpus.py), with tied embeddings so it ships in a few MB. Same seed -> same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))
from corpus import load_corpus  # noqa: E402
from train_target import DEFAULT_DATA, MIXTURE, heldout_loss, sample_windows, token_stream  # noqa: E402

from aurora_sgl import reference_model_path  # noqa: E402

DEFAULT_OUT = HERE / "draft_lm"

DRAFT_SHAPE = dict(
    hidden_size=128,
    intermediate_size=352,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,  # half the bytes; the embedding is most of this model
)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the shared/datasets folder")
    ap.add_argument("--target", type=Path, default=Path(reference_model_path()), help="model whose tokenizer to share")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--eval-windows", type=int, default=48)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        corpus = load_corpus(args.data_dir, args.seed)
    except SystemExit as e:  # DatasetMissing: one line, non-zero exit
        print(e, file=sys.stderr)
        return 2

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tokenizer = AutoTokenizer.from_pretrained(args.target)
    tokenizer.save_pretrained(args.out)
    streams = {d: token_stream(tokenizer, dom.train) for d, dom in corpus.items()}
    held = {d: token_stream(tokenizer, dom.heldout) for d, dom in corpus.items()}
    print(f"data: {time.time() - t0:.0f}s", flush=True)

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **DRAFT_SHAPE,
    )
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    gen = torch.Generator().manual_seed(args.seed)
    domains = list(MIXTURE)
    counts = [round(MIXTURE[d] * args.batch_size) for d in domains]
    counts[0] += args.batch_size - sum(counts)
    warmup = max(1, args.steps // 20)
    t_train = time.time()
    model.train()
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = torch.cat([sample_windows(streams[d], c, args.seq_len, gen) for d, c in zip(domains, counts)])
        loss = model(batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}/{args.steps} loss {loss.item():.3f} {(time.time() - t_train) / 60:.1f} min", flush=True)
    train_minutes = (time.time() - t_train) / 60

    model.eval()
    losses = {d: round(heldout_loss(model, s, args.eval_windows, 256), 4) for d, s in held.items()}
    # Shipped in float32, the dtype the benchmark runs it in (about 5 MB with tied embeddings).
    model.save_pretrained(args.out, safe_serialization=True)
    stats = {
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "threads": args.threads,
        "train_minutes": round(train_minutes, 1),
        "train_tokens_seen": args.steps * args.batch_size * args.seq_len,
        "parameters": sum(p.numel() for p in model.parameters()),
        "heldout_loss_nats": losses,
        "eval_windows": args.eval_windows,
        "target": "aurora_sgl/reference_model",
    }
    (args.out / "training_stats.json").write_text(json.dumps(stats, indent=2))
    write_card(args.out, stats)
    print(json.dumps(stats, indent=2))
    return 0


def write_card(out: Path, stats: dict) -> None:
    target = json.loads((Path(reference_model_path()) / "training_stats.json").read_text())["heldout_loss_nats"]
    rows = "\n".join(f"| {d} | {v:.3f} | {target[d]:.3f} |" for d, v in stats["heldout_loss_nats"].items())
    (out / "README.md").write_text(f"""# Draft LM for the aurora_sgl reference model

A {DRAFT_SHAPE["num_hidden_layers"]}-layer, hidden-{DRAFT_SHAPE["hidden_size"]} Llama ({stats["parameters"]:,} parameters,
tied embeddings, float32) sharing the reference model's tokenizer, trained from scratch by
`python benchmarks/reference/train_draft_lm.py` on the reference model's corpus and mixture
(benchmarks/reference/corpus.py: Python stdlib, GSM8K train, Tiny Shakespeare, stdlib docstrings;
all permissively licensed): {stats["steps"]} steps x {stats["batch_size"]} x {stats["seq_len"]} tokens, AdamW lr {stats["lr"]}
cosine, seed {stats["seed"]}, {stats["threads"]} CPU thread, {stats["train_minutes"]} min. It exists only as the
`assistant_model` of transformers' assisted generation in benchmarks/speed.py.

Held-out loss (nats per token, {stats["eval_windows"]} windows of 256 tokens per domain):

| domain | draft LM | reference model |
|---|---|---|
{rows}
""")


if __name__ == "__main__":
    sys.exit(main())
