"""Training math for the draft head: the objectives over the EAGLE-3 training-time-test (TTT)
unroll (the unroll itself is engine/unroll.py: the guardrail and the engine's head choice use it too).

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

import torch

OBJECTIVES = ("kl", "kl_rejected", "accept")


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
