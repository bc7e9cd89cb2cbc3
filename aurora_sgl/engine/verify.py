"""Verification math: given K drafted tokens and the target's view of them, which are accepted and
which token comes next. Pure functions over tensors; randomness comes in as uniforms so every
caller (engine, tests, the trainer's simulator) controls it.

Notation per row: drafts d_1..d_K; target distributions p_0..p_K where p_i is the target's
distribution for the token after d_i (p_0 follows the last committed token); q_1..q_K the
distributions the drafts were sampled from. Returns (num_accepted [B] in 0..K, next_token [B]):
the committed tokens are d_1..d_a followed by next_token.
"""

from __future__ import annotations

import torch


def sample_with_uniform(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V] (need not be normalised), u [N] in [0, 1).
    Never returns a zero-probability token."""
    cdf = probs.float().cumsum(-1)
    x = (u.float() * cdf[:, -1]).unsqueeze(-1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(-1)
    return idx.clamp_(max=probs.shape[-1] - 1)


def verify_greedy(drafts: torch.Tensor, target_logits: torch.Tensor):
    """drafts [B, K], target_logits [B, K+1, V]. Accept while d_i == argmax p_{i-1}."""
    best = target_logits.argmax(-1)
    k = drafts.shape[1]
    matches = (drafts == best[:, :k]).to(torch.int64)
    accepted = matches.cumprod(dim=1).sum(dim=1)
    next_token = best.gather(1, accepted.unsqueeze(1)).squeeze(1)
    return accepted, next_token


def verify_sampling(
    drafts: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    u_accept: torch.Tensor,
    u_next: torch.Tensor,
):
    """Speculative rejection sampling (Leviathan et al. / Chen et al.), exact for any draft q.

    drafts [B, K]; draft_probs [B, K, V] (q_1..q_K in target-vocab space); target_probs
    [B, K+1, V]; u_accept [B, K] and u_next [B] uniforms in [0, 1).
    d_i is accepted with probability min(1, p(d_i) / q(d_i)); at the first rejection the next token is
    drawn from norm(max(p - q, 0)); if all K are accepted it is drawn from p_K (the bonus token).
    """
    bsz, k = drafts.shape
    p_d = target_probs[:, :k].gather(2, drafts.unsqueeze(2)).squeeze(2)
    q_d = draft_probs.gather(2, drafts.unsqueeze(2)).squeeze(2)
    accept = (u_accept * q_d < p_d).to(torch.int64)  # u < p/q without dividing by q
    accepted = accept.cumprod(dim=1).sum(dim=1)
    rows = torch.arange(bsz, device=drafts.device)
    p_at = target_probs[rows, accepted]
    q_padded = torch.cat([draft_probs, torch.zeros_like(draft_probs[:, :1])], dim=1)
    residual = (p_at - q_padded[rows, accepted]).clamp_(min=0)
    # A rejection implies p > q somewhere, so the residual has mass; guard float round-off anyway.
    empty = residual.sum(-1) <= 0
    if bool(empty.any()):
        residual[empty] = p_at[empty]
    return accepted, sample_with_uniform(residual, u_next)
