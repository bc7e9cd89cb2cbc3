"""Training sequences, their padded batch in the alignment `losses` expects, and one optimizer
step: shared by offline training and the online trainer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.engine.unroll import ttt_logits
from aurora_sgl.training.losses import draft_loss


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
