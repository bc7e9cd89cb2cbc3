"""Target model wrapper: a Hugging Face Llama-family causal LM run over a static per-slot KV cache.

We run the model's own modules (its norms, projections, rotary embedding) layer by layer rather than
calling `model(...)`, because continuous batching needs a different position per row and a cache
indexed by (slot, position); transformers' caches assume one position per batch. Along the way the
EAGLE-3 auxiliary hidden states (outputs of `aux_layer_ids`) and the final normed hidden state are
kept for every position, for the draft head and the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora_sgl.engine.attention import apply_rope, cached_attention
from aurora_sgl.engine.draft_head import default_aux_layer_ids

SUPPORTED = ("llama", "mistral", "qwen2")


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [B, T, V] float32
    aux_hidden: torch.Tensor  # [B, T, len(aux) * H]
    final_hidden: torch.Tensor  # [B, T, H], after the final norm (lm_head's input)


def load_hf_causal_lm(model_path: str, device: str | torch.device = "cpu", dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    if model.config.model_type not in SUPPORTED:
        raise ValueError(
            f"unsupported target architecture '{model.config.model_type}' (supported: {', '.join(SUPPORTED)})"
        )
    return model.to(device).eval()


class TargetModel:
    def __init__(self, model, max_slots: int, max_len: int, aux_layer_ids: list[int] | None = None):
        self.hf = model
        cfg = model.config
        self.config = cfg
        self.num_layers = cfg.num_hidden_layers
        self.aux_layer_ids = list(aux_layer_ids or default_aux_layer_ids(self.num_layers))
        bad = [i for i in self.aux_layer_ids if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"aux layer ids {bad} out of range for a {self.num_layers}-layer target")
        self.heads = cfg.num_attention_heads
        self.kv_heads = getattr(cfg, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        self.max_len = max_len
        p = next(model.parameters())
        shape = (self.num_layers, max_slots, self.kv_heads, max_len, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.v_cache = torch.zeros(shape, dtype=p.dtype, device=p.device)
        self.device = p.device
        self.dtype = p.dtype

    @property
    def embed_tokens(self):
        return self.hf.get_input_embeddings()

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @torch.no_grad()
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        slot_range: tuple[int, int] | None = None,
        logits_rows: torch.Tensor | None = None,
    ) -> TargetOutput:
        """tokens/positions [B, T], slots [B]. `logits_rows` ([B] index of one position per row)
        limits the lm_head to that position, which is all a prefill chunk needs."""
        inner = self.hf.model
        h = inner.embed_tokens(tokens)
        cos, sin = inner.rotary_emb(h, positions)
        b, t, _ = h.shape
        aux: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(inner.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            o = cached_attention(q, k, v, self.k_cache[i], self.v_cache[i], slots, positions, slot_range)
            h = h + attn.o_proj(o.transpose(1, 2).reshape(b, t, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if i in self.aux_layer_ids:
                aux[i] = h
        final = inner.norm(h)
        if logits_rows is not None:
            pick = final[torch.arange(b, device=final.device), logits_rows].unsqueeze(1)
            logits = self.hf.lm_head(pick).float()
        else:
            logits = self.hf.lm_head(final).float()
        aux_hidden = torch.cat([aux[i] for i in self.aux_layer_ids], dim=-1)
        return TargetOutput(logits=logits, aux_hidden=aux_hidden, final_hidden=final)

    def move_slot(self, src: int, dst: int, length: int) -> None:
        """Copy one request's cache rows (compaction keeps running requests in slots 0..n-1)."""
        self.k_cache[:, dst, :, :length] = self.k_cache[:, src, :, :length]
        self.v_cache[:, dst, :, :length] = self.v_cache[:, src, :, :length]
