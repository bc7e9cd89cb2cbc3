"""Write the reference model's card (README.md) from the training run's training_stats.json.

python benchmarks/reference/model_card.py [MODEL_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def write_model_card(out: Path) -> Path:
    stats = json.loads((out / "training_stats.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    size_mb = (out / "model.safetensors").stat().st_size / 1e6
    losses = stats["heldout_loss_nats"]
    bounds = stats.get("heldout_loss_bounds", {})
    rows = "\n".join(f"| {d} | {v:.3f} | {bounds.get(d, float('nan')):.2f} |" for d, v in losses.items())
    samples = "\n\n".join(
        f"**{d}** prompt:\n\n```\n{stats['prompts'][d]}\n```\n\ngreedy continuation (48 tokens):\n\n```\n{text}\n```"
        for d, text in stats["greedy_samples"].items()
    )
    card = f"""# aurora_sgl reference target model

A small Llama-architecture causal LM trained by this project so that everything -- tests, benchmarks,
the default server -- runs offline with no model hub. It is deliberately small: a CPU can serve it,
and its behaviour differs per domain (code, math word problems, prose), which the traffic-shift
benchmarks rely on. It is not a useful assistant.

| | |
|---|---|
| architecture | `LlamaForCausalLM`, {cfg["num_hidden_layers"]} layers, hidden {cfg["hidden_size"]}, MLP {cfg["intermediate_size"]}, {cfg["num_attention_heads"]} heads, context {cfg["max_position_embeddings"]} |
| parameters | {stats["parameters"]:,} ({size_mb:.1f} MB in bf16 safetensors) |
| tokenizer | byte-level BPE, {cfg["vocab_size"]} tokens, trained with `tokenizers`; specials `<|bos|>`, `<|eos|>`, `<|pad|>`, `<|system|>`, `<|user|>`, `<|assistant|>`; chat template in `tokenizer_config.json` / `chat_template.jinja` |
| training | {stats["steps"]} steps x {stats["batch_size"]} x {stats["seq_len"]} tokens = {stats["train_tokens_seen"]:,} tokens, AdamW lr {stats["lr"]} cosine, seed {stats["seed"]}, {stats["threads"]} CPU threads: {stats["train_minutes"]} min of training, {stats["total_minutes"]} min in all on a 2-core machine |
| command | `python benchmarks/reference/train_target.py` (it also writes this card, via `benchmarks/reference/model_card.py`) |

## Data (all local, permissively licensed)

- **code**: Python {sys.version.split()[0]} standard-library sources (PSF licence), 5% of files held out by path hash;
- **math**: GSM8K *train* split (MIT), in `Question: ... Answer: ...` and chat form; its last 400 rows held out. The test split is never read (the benchmarks stream it);
- **prose**: Tiny Shakespeare (public domain) with its last 10% held out, and docstrings of the standard library (plain and as chat answers).

HumanEval and MT-Bench are never read. `heldout_sample.jsonl` carries a few KB of each held-out
domain so the tests can check the loss without the datasets.

## Held-out loss (nats per token, {stats.get("eval_windows", 48)} windows of 256 tokens per domain)

| domain | loss | bound asserted by `tests/test_reference_model.py` |
|---|---|---|
{rows}

## Greedy continuations

{samples}
"""
    path = out / "README.md"
    path.write_text(card)
    return path


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "aurora_sgl" / "reference_model"
    print(write_model_card(target))
