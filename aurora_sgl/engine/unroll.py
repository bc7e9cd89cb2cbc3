"""The draft head unrolled over teacher-forced rows, as it drafts when serving: the EAGLE-3
training-time-test (TTT) unroll, and the accept length a head would get drafting from each row.
Training takes its losses from these logits (training/losses.py); the trainer's guardrail and the
engine's head choice (engine/head_choice.py) score heads with the simulated accept length.

Alignment, per sequence of length T:
  aux[t]          target auxiliary hidden states at position t            [B, T, 3H]
  next_tokens[t]  x_{t+1}, the token after position t                     [B, T]
Unroll step k (0-based) at position t is the (k+1)-th draft of a serving step whose last verified
position was t-k: its hidden input is the target's features for k = 0 and the head's own output at
t-1 from step k-1 otherwise, and it attends to teacher-forced keys at positions <= t-k plus the
keys its own chain produced at steps 1..k -- exactly the draft KV cache at serving time.
"""

from __future__ import annotations

import math

import torch


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


def simulated_tau_per_start(
    step_logits: list[torch.Tensor], hot_ids: torch.Tensor, target_argmax: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """tau_sim(s) = 1 + sum_{k<K} prod_{j<=k} agree_j(s+j), agree_j(t) = (hot_ids[argmax of unroll
    step j at t] == target_argmax[t]) and mask[t]; positions past the end never agree.
    step_logits: K x [B, T, Vd]; target_argmax, mask: [B, T]. Returns [B, T] (valid where mask)."""
    b, t = mask.shape
    run = torch.ones(b, t, dtype=torch.bool, device=mask.device)
    tau = torch.ones(b, t, dtype=torch.float64, device=mask.device)
    for j, logits in enumerate(step_logits):
        agree = (hot_ids[logits.argmax(-1)] == target_argmax) & mask
        shifted = torch.zeros_like(agree)  # shifted[s] = agree[s + j]
        if j < t:
            shifted[:, : t - j] = agree[:, j:]
        run = run & shifted
        tau += run
    return tau
