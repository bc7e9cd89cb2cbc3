"""The record contract between the serving side (either backend) and the trainer.

After every verify step the serving side emits one `StepRecord` per request: what was drafted,
what the target chose at each draft position, and the target's hidden states at the committed
positions. Prompt positions are emitted too, as records with no drafts (the head attends to the
prompt when it drafts, so the trainer needs that context). The signal ring carries records across
the process boundary; the trainer reads them back as `RingRecord`s with the same fields.

Positions are absolute: `position` is the position of x_n, the last committed token before the
step, which is the first verified input.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import torch

NO_TOKEN = -1  # draft / target token at a position with no draft (prompt rows, past a rejection)


class Outcome(IntEnum):
    """What happened to draft position j in one verify step (stored as int8)."""

    NOT_REACHED = -1  # an earlier draft was rejected, or the record is a prompt record
    REJECTED = 0
    ACCEPTED = 1


@dataclass
class StepRecord:
    """One request's outcome in one verify step (positions are absolute)."""

    request_id: str
    position: int  # position of the last committed token x_n, the first verified input
    draft_tokens: torch.Tensor  # [K] target ids (NO_TOKEN on prompt records)
    target_tokens: torch.Tensor  # [K] the target's token at each draft position (NO_TOKEN past the first rejection)
    outcome: torch.Tensor  # [K] int8 Outcome values
    num_accepted: int
    committed: list[int]  # tokens appended to the output this step (after stop/limit truncation)
    input_tokens: torch.Tensor  # [a+1] x_n..x_{n+a}: tokens at the positions whose states follow
    next_tokens: torch.Tensor  # [a+1] x_{n+1}..x_{n+a+1}: the token the target chose after each
    aux_hidden: torch.Tensor  # [a+1, 3H] view
    final_hidden: torch.Tensor  # [a+1, H] view
    draft_version: int
    prefill: bool = False  # prompt positions: no drafts, but context the trainer needs
    num_drafted: int | None = None  # drafts this step (adaptive K); None: all K
    draft_head: int = 0  # 0: the live head drafted; i > 0: the engine's fallback head i (not in the ring)


def chain_outcome(k: int, accepted: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Outcome row of a chain of k drafts of which the first `accepted` were accepted."""
    out = torch.full((k,), Outcome.NOT_REACHED, dtype=torch.int8, device=device)
    out[:accepted] = Outcome.ACCEPTED
    if accepted < k:
        out[accepted] = Outcome.REJECTED
    return out


def prompt_records(
    request_id: str,
    start: int,
    k: int,
    input_tokens: torch.Tensor,
    next_tokens: torch.Tensor,
    aux_hidden: torch.Tensor,
    final_hidden: torch.Tensor,
    draft_version: int,
    first: int = 0,
) -> list[StepRecord]:
    """Prompt rows [first, n) of one request as records of at most K+1 rows (the ring's row
    limit); row i sits at absolute position start + i. The tensors are sliced, not copied."""
    rows = k + 1
    n = input_tokens.shape[0]
    dev = input_tokens.device
    none = torch.full((k,), NO_TOKEN, dtype=torch.long, device=dev)
    outcome = torch.full((k,), Outcome.NOT_REACHED, dtype=torch.int8, device=dev)
    out = []
    for s in range(first, n, rows):
        e = min(n, s + rows)
        out.append(
            StepRecord(
                request_id=request_id,
                position=start + s,
                draft_tokens=none,
                target_tokens=none,
                outcome=outcome,
                num_accepted=e - s - 1,
                committed=[],
                input_tokens=input_tokens[s:e],
                next_tokens=next_tokens[s:e],
                aux_hidden=aux_hidden[s:e],
                final_hidden=final_hidden[s:e],
                draft_version=draft_version,
                prefill=True,
            )
        )
    return out


def is_prompt_record(rec) -> bool:
    """Prompt positions: the record's own flag (StepRecord.prefill, carried by the ring). Having no
    drafts does not make a record a prompt record -- a decode step at K = 0 drafts nothing."""
    return bool(rec.prefill)


def first_rejection(outcome: torch.Tensor) -> int | None:
    """Index of the rejected draft in an outcome row, or None when no draft was rejected."""
    rejected = (outcome == Outcome.REJECTED).nonzero().flatten()
    return int(rejected[0]) if rejected.numel() else None
