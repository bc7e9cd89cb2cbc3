"""Which head drafts a request: the live (online-trained) head, or a fallback head kept frozen.

An online head follows its traffic and forgets what it no longer sees: when a domain it left comes
back, the requests in flight are drafted by a head that has not yet relearned it, and no judgement
made from finished requests can come soon enough for them. The prompt is known before the first
draft, though, and the target has already computed its states: each head's simulated accept length
over the prompt's last positions (teacher-forced on the target's own next-token choices, as the
trainer's guardrail scores heads) tells which head knows this text. A fallback head drafts the
request only when it beats the live head there by a margin, so a live head that knows the traffic
keeps it (benchmarks/README.md, "Fallback head").
"""

from __future__ import annotations

import torch

from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.trainer.guardrail import simulated_tau_per_start
from aurora_sgl.training.losses import ttt_logits

# The prompt positions scored: the last this many before the first generated token.
SCORE_POSITIONS = 64
# Simulated accept length a fallback head must gain over the live head on the prompt. Chosen on the
# tuning domains (HumanEval, MT-Bench, GSM8K) with the two reference heads each playing the live
# one: 0.05 kept the live head's accept length when it was the better head (-0.6 %) and recovered
# most of the gap when it was not (2.29 -> 2.98 of an oracle's 3.05).
FALLBACK_MARGIN = 0.05


@torch.no_grad()
def prompt_score(
    head: Eagle3Head, aux: torch.Tensor, next_tokens: torch.Tensor, target_next: torch.Tensor, steps: int
) -> float:
    """The head's mean simulated accept length over one prompt's positions with `steps` drafts.
    aux [T, 3H] target states at positions t, next_tokens [T] the token at t + 1, target_next [T]
    the target's greedy choice for t + 2 (-1 where unknown: those starts and chains end there)."""
    mask = (target_next >= 0).unsqueeze(0)
    if not bool(mask.any()):
        return 1.0
    logits = ttt_logits(head, aux.unsqueeze(0).to(head.fc.weight.dtype), next_tokens.unsqueeze(0), steps)
    tau = simulated_tau_per_start(logits, head.hot_ids, target_next.unsqueeze(0), mask)
    return float((tau * mask).sum() / mask.sum())


def choose_head(scores: list[float], margin: float = FALLBACK_MARGIN) -> int:
    """scores[0] is the live head's, the rest the fallbacks'. The best fallback drafts only when it
    beats the live head by more than `margin`; ties and near-ties stay with the live head."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return best if best and scores[best] > scores[0] + margin else 0
