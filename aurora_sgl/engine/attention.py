"""Attention over a static per-slot KV cache, shared by the target wrapper and the draft head.

The cache is indexed by absolute position (gpt-fast's layout): a step writes its keys/values at the
positions of its tokens and attends to every key at a position <= the query's. Entries written for
drafts that were later rejected sit beyond the accepted length, are never attended (the causal
mask hides them) and are overwritten by the next step's tokens: no rollback copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """Default (unscaled) rotary tables for integer positions [..., T] -> cos, sin [..., T, head_dim]."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos/sin [B, T, D] (Llama's rotate-half convention)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def rows_view(cache: torch.Tensor, rows: torch.Tensor, row_range: tuple[int, int] | None, length: int):
    """The cache rows of this batch up to `length`: a view when the rows are contiguous slots."""
    if row_range is not None:
        return cache[row_range[0] : row_range[1], :, :length]
    return cache.index_select(0, rows)[:, :, :length]


def cached_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    positions: torch.Tensor,
    slot_range: tuple[int, int] | None = None,
) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, KVH, T, D] at `positions` [B, T] of cache rows `slots` [B].

    Writes k/v into the cache, then attends causally by absolute position. `slot_range` is
    (first, last+1) when `slots` is that contiguous range, which lets the read be a view.
    Returns [B, H, T, D].
    """
    # cache: [slots, KVH, max_len, D]; advanced indices (slot, pos) broadcast to [B, T].
    k_cache[slots[:, None], :, positions] = k.transpose(1, 2)
    v_cache[slots[:, None], :, positions] = v.transpose(1, 2)
    length = int(positions.max()) + 1
    keys = rows_view(k_cache, slots, slot_range, length)
    values = rows_view(v_cache, slots, slot_range, length)
    key_pos = torch.arange(length, device=q.device)
    mask = key_pos.view(1, 1, 1, length) <= positions.view(positions.shape[0], 1, positions.shape[1], 1)
    n_rep = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(q, _repeat_kv(keys, n_rep), _repeat_kv(values, n_rep), attn_mask=mask)
