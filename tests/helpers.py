"""Small things the tests build: a random Llama, tiny EAGLE-3 heads, and the prompts a tiny head
memorises. Fixtures that share them across a session live in conftest.py."""

from __future__ import annotations

import torch

from aurora_sgl.engine.draft_head import Eagle3Config, Eagle3Head


def make_tiny_llama(
    vocab_size: int,
    seed: int = 0,
    layers: int = 6,
    hidden: int = 64,
    kv_heads: int = 2,
    bos: int = 1,
    eos: int = 2,
    pad: int = 0,
    init_range: float = 0.02,
):
    """A small random Llama for fast exactness tests (the reference model covers realism)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        initializer_range=init_range,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_head_config(
    *,
    hidden: int = 32,
    vocab: int = 60,
    draft_vocab: int = 24,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    aux_layer_ids: tuple[int, ...] = (0, 1, 2),
) -> Eagle3Config:
    return Eagle3Config(
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        draft_vocab_size=draft_vocab,
        aux_layer_ids=list(aux_layer_ids),
    )


def tiny_head(config: Eagle3Config, embed=None, *, seed: int | None = None, hot_ids=None) -> Eagle3Head:
    """A head for `config` (embedding zeros unless given), its weights drawn from `seed`."""
    if embed is None:
        embed = torch.zeros(config.vocab_size, config.hidden_size)
    head = Eagle3Head(config, embed)
    if seed is not None:
        head.reset_parameters(seed)
    if hot_ids is not None:
        head.set_draft_vocab(hot_ids)
    return head


# Prompts the tiny head is trained on: it memorises their continuations, so with it drafts are
# often accepted and the multi-token accept paths run (a random head only exercises rejections).
PROMPTS = [
    f"{kind} number {i}: " + "x " * (i % 7)
    for i, kind in enumerate(["def f(x):", "Question: apples", "ROMEO:", "The module", "import os", "Tom has"] * 3)
]
MAX_NEW = 24


def exact_two_token_dist(model, tok, prompt, params) -> dict:
    """P(first two generated tokens) under target-only sampling with `params`, computed exactly."""
    from aurora_sgl.engine.sampling import probs_from_logits

    ids = tok(prompt, return_tensors="pt").input_ids
    t = torch.tensor([params.temperature])
    tp, tk = torch.tensor([params.top_p]), torch.tensor([params.top_k])
    with torch.no_grad():
        p1 = probs_from_logits(model(ids).logits[:, -1], t, tp, tk)[0]
        dist = {}
        for a in p1.nonzero().flatten().tolist():
            p2 = probs_from_logits(model(torch.cat([ids, torch.tensor([[a]])], 1)).logits[:, -1], t, tp, tk)[0]
            for b in p2.nonzero().flatten().tolist():
                dist[(a, b)] = float(p1[a] * p2[b])
    return dist


def chi_square(counts: dict, exact: dict, n: int) -> tuple[float, int]:
    """Chi-square of sample counts against `exact` over the cells expected at least 5 times."""
    cells = [c for c in exact if exact[c] * n >= 5]
    return sum((counts.get(c, 0) - exact[c] * n) ** 2 / (exact[c] * n) for c in cells), len(cells)


def chi2_critical_999(df: int) -> float:
    """The chi-square value exceeded with probability 0.001 (Wilson-Hilferty, within 1% for df >= 3)."""
    z, c = 3.0902, 2.0 / (9 * df)
    return df * (1 - c + z * c**0.5) ** 3


def tiny_engines(model, tok, head_dir, ks) -> dict:
    """{k: Engine} on one model, K = 0 without a head, every other K drafting with `head_dir`."""
    from aurora_sgl.engine.engine import Engine

    return {
        k: Engine(
            model=model,
            tokenizer=tok,
            num_speculative_steps=k,
            max_running_requests=8,
            draft_model_path=head_dir if k else None,
        )
        for k in ks
    }


def non_view_ops(fn) -> int:
    """aten operations other than views (each a kernel launch or copy on a device) run by fn()."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view:
                Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n
