"""The guardrail's measure: the simulated accept length of a head on held-out recent sequences,
teacher-forced, so a candidate can be compared with the served weights before it is published."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.engine.unroll import simulated_tau_per_start, ttt_logits
from aurora_sgl.training.batches import HeadBatch, Sequence


def mean_of_sums(sums: Iterable[tuple[float, int]]) -> tuple[float, int] | None:
    total = count = 0
    for s, c in sums:
        total, count = total + s, count + c
    return (total / count, count) if count else None


@torch.no_grad()
def simulated_tau_sums(
    head: Eagle3Head, held_out: list[tuple[Sequence, torch.Tensor]], steps: int, group: int = 8
) -> list[tuple[float, int]]:
    """Per held-out sequence: (sum of the simulated accept length over its valid starts, number of
    starts). Causal attention makes each sequence's figure independent of its batch-mates, so the
    trainer can cache the served head's figures per sequence."""
    was_training = head.training
    head.eval()
    device = head.fc.weight.device
    out: list[tuple[float, int]] = []
    for i in range(0, len(held_out), group):
        chunk = held_out[i : i + group]
        batch = HeadBatch.from_sequences([s for s, _ in chunk])
        tgt = torch.full_like(batch.next_tokens, -1)
        for r, (_, am) in enumerate(chunk):
            tgt[r, : am.numel()] = am
        mask = batch.mask.to(device)
        logits = ttt_logits(head, batch.aux.to(device, head.fc.weight.dtype), batch.next_tokens.to(device), steps)
        tau = simulated_tau_per_start(logits, head.hot_ids, tgt.to(device), mask)
        out += zip((tau * mask).sum(1).tolist(), mask.sum(1).tolist())
    head.train(was_training)
    return out
