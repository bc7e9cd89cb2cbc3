"""Training math for the draft head: the EAGLE-3 training-time-test (TTT) unroll and the objectives.

Alignment used throughout, per sequence of length T:
  aux[t]          target auxiliary hidden states at position t            [B, T, 3H]
  next_tokens[t]  x_{t+1}, the token after position t                     [B, T]
  target[t]       target logits for x_{t+2} (the target at position t+1) [B, T, V]
Unroll step k (0-based) at position t is the (k+1)-th draft of a serving step whose last verified
position was t-k: its hidden input is the target's features for k = 0 and the head's own output at
t-1 from step k-1 otherwise, and it attends to teacher-forced keys at positions <= t-k plus the
keys its own chain produced at steps 1..k -- exactly the draft KV cache at serving time.
"""

from __future__ import annotations

import math

import torch

OBJECTIVES = ("kl", "kl_rejected", "accept")


def _shift_right(x: torch.Tensor, by: int, dim: int) -> torch.Tensor:
    """out[t] = x[t - by] along `dim`, zero-filled at the front (all zeros when `by` >= the length:
    a sequence shorter than the unroll has no position that step reaches)."""
    if by == 0:
        return x
    if by >= x.shape[dim]:
        return torch.zeros_like(x)
    pad = torch.zeros_like(x.narrow(dim, 0, by))
    return torch.cat([pad, x.narrow(dim, 0, x.shape[dim] - by)], dim=dim)


def _ttt_attention(q, keys, values, k):
    """q [B, H, T, D]; keys/values: per unroll step [B, KVH, T, D], step 0 teacher-forced."""
    n_rep = q.shape[1] // keys[0].shape[1]
    rep = (lambda x: x.repeat_interleave(n_rep, dim=1)) if n_rep > 1 else (lambda x: x)
    scale = 1.0 / math.sqrt(q.shape[-1])
    t = q.shape[2]
    scores = (q @ rep(keys[0]).transpose(-1, -2)) * scale  # [B, H, T, T]
    qpos = torch.arange(t, device=q.device).unsqueeze(1)
    kpos = torch.arange(t, device=q.device).unsqueeze(0)
    # Queries with t < k have no valid chain (loss-masked); let them see key 0 to stay finite.
    allowed = kpos <= (qpos - k).clamp(min=0)
    scores = scores.masked_fill(~allowed, float("-inf"))
    shifted_v = []
    diag = []
    for i in range(1, k + 1):
        e_k = _shift_right(rep(keys[i]), k - i, dim=2)
        shifted_v.append(_shift_right(rep(values[i]), k - i, dim=2))
        diag.append((q * e_k).sum(-1, keepdim=True) * scale)
    probs = torch.softmax(torch.cat([scores] + diag, dim=-1), dim=-1)
    out = probs[..., :t] @ rep(values[0])
    for i, v in enumerate(shifted_v):
        out = out + probs[..., t + i : t + i + 1] * v
    return out


def ttt_logits(head, aux: torch.Tensor, next_tokens: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Draft-vocab logits [B, T, Vd] for each of `steps` unroll steps."""
    b, t, _ = aux.shape
    positions = torch.arange(t, device=aux.device).expand(b, t)
    attn = head.midlayer.self_attn
    keys, values, outs = [], [], []
    hidden = head.project(aux)
    for k in range(steps):

        def attend(x, k=k):
            q, kk, vv = attn.qkv(x, positions)
            keys.append(kk)
            values.append(vv)
            return _ttt_attention(q, keys, values, k)

        h = head.layer(hidden, next_tokens, attend)
        outs.append(head.logits(h))
        hidden = _shift_right(h, 1, dim=1)
    return outs


def draft_loss(
    step_logits: list[torch.Tensor],
    target_logits: torch.Tensor,
    hot_ids: torch.Tensor,
    mask: torch.Tensor,
    objective: str = "kl",
    step_weight: float = 0.8,
    position_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """Weighted sum over unroll steps (weight step_weight**k) of a per-position loss.

    kl           forward KL(p || q) with p the target restricted to the draft vocabulary (EAGLE-3);
    kl_rejected  the same with `position_weight` (e.g. 1 + w where the serving draft was rejected);
    accept       -log(alpha), alpha = sum_v min(p_v, q_v) over the full target vocabulary: the
                 acceptance probability of a draft sampled from q (LK / TV losses).
    mask [B, T] marks positions whose prediction target is a generated token.
    Returns (loss, stats) with per-step acceptance proxies for logging.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective '{objective}' (choose from {', '.join(OBJECTIVES)})")
    dtype = torch.promote_types(target_logits.dtype, torch.float32)  # float64 in the tests
    tgt = target_logits.to(dtype)
    t = tgt.shape[1]
    tpos = torch.arange(t, device=tgt.device)
    if objective == "accept":
        p_full = torch.softmax(tgt, dim=-1)
    else:
        p_hot = torch.softmax(tgt.index_select(-1, hot_ids), dim=-1)
        log_p_hot = torch.log_softmax(tgt.index_select(-1, hot_ids), dim=-1)
    weight_pos = position_weight if (objective == "kl_rejected" and position_weight is not None) else None
    total = tgt.new_zeros(())
    stats = {"step_loss": [], "step_top1": []}
    for k, logits in enumerate(step_logits):
        valid = mask & (tpos >= k).unsqueeze(0)
        w = valid.float() if weight_pos is None else valid.float() * weight_pos
        denom = w.sum().clamp(min=1.0)
        log_q = torch.log_softmax(logits.to(dtype), dim=-1)
        if objective == "accept":
            q_full = torch.zeros_like(p_full).index_copy_(-1, hot_ids, log_q.exp())
            alpha = torch.minimum(p_full, q_full).sum(-1)
            per_pos = -torch.log(alpha.clamp(min=1e-6))
        else:
            per_pos = (p_hot * (log_p_hot - log_q)).sum(-1)
        step = (per_pos * w).sum() / denom
        total = total + (step_weight**k) * step
        with torch.no_grad():
            hit = (hot_ids[logits.argmax(-1)] == tgt.argmax(-1)).float()
            stats["step_loss"].append(float(step))
            stats["step_top1"].append(float((hit * valid).sum() / valid.sum().clamp(min=1)))
    return total, stats
