"""Which head drafts a request: the live (online-trained) head, or a fallback head kept frozen.

An online head follows its traffic and forgets what it no longer sees: when a domain it left comes
back, the requests in flight are drafted by a head that has not yet relearned it, and no judgement
made from finished requests can come soon enough for them. Each request carries its own evidence,
though: the target has computed its states at every position, so each head's simulated accept
length over the request's latest positions (teacher-forced on the target's own tokens, as the
trainer's guardrail scores heads) tells which head knows this text. The choice is made twice: when
the prompt is prefilled (its last positions; a prompt often reads unlike its answer -- a docstring
before code, a question before an essay) and again, final, after the first DECIDE_AFTER_TOKENS
generated tokens, scored on those tokens alone (with a few prompt rows before them as context), so
the request's own output decides. A head that takes over mid-request first runs over the request's
whole context, so its cache is exact. Another head replaces the incumbent only when it beats it by
a margin (benchmarks/README.md, "Fallback head").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from aurora_sgl.engine.draft_head import Eagle3Head
from aurora_sgl.engine.unroll import simulated_tau_per_start, ttt_logits

# The positions a head is scored on at prefill: the prompt's newest this many.
SCORE_POSITIONS = 64
# The final choice scores drafts from the generated positions only, and runs the head over this
# many prompt rows before them first (the context its attention needs; their drafts not counted).
SCORE_CONTEXT = 16
# Drafts per start a head is scored on: its first draft's agreement with the target. A head's
# unroll over K steps costs K times one step, and on this CPU's small reference target four steps
# over 64 rows cost as much as a decode step of a batch of 8 (29 ms per head and choice). Offline
# (benchmarks/head_choice_offline.py, tuning domains, margin 0.05, each reference head playing the
# live one) one step picks as well as four: 3.152 / 3.149 accept length against 3.111 / 3.156.
SCORE_STEPS = 1
# Simulated accept length another head must gain over the incumbent to take a request: a switch
# costs a run over the whole context, and scores on 64 positions are noisy. Offline on the tuning
# domains (benchmarks/head_choice_offline.py, results/traffic_shift_fallback/offline_g16.json; each
# reference head playing the live one) 0.05 gave 3.156 / 3.111 accept length, margin 0 gave 3.165 /
# 3.169 (the general head alone 3.114, the code head alone 2.153, a per-request oracle 3.195); the
# online runs of benchmarks/README.md ("Fallback head") used 0.05.
FALLBACK_MARGIN = 0.05
# Generated tokens after which the choice is made again, and kept. Offline, the prompt's end alone
# picked 2.959 / 2.867 (offline_g0.json) -- worse than always drafting with the general head, as a
# prompt often reads unlike its answer -- and with the first 16 generated tokens 3.156 / 3.111.
DECIDE_AFTER_TOKENS = 16


# A new request starts from the head most of the last this many requests ended with (traffic comes
# in runs of one kind); its prompt can still move it, by the margin, and its output decides.
RECENT_CHOICES = 16


def usual_head(recent: Iterable[int]) -> int:
    """The head most recent final choices went to; ties and no history: the live head (0)."""
    counts = Counter(recent)
    return max(counts, key=lambda i: (counts[i], i == 0, -i)) if counts else 0


@dataclass
class HeadEvidence:
    """What a request keeps until its head choice is final: every row its drafting head consumed
    (to rebuild another head's cache on a switch) and the newest rows to score heads on. Row
    tensors are views of the step's outputs; nothing is copied."""

    # (aux_hidden [n, 3H], the token after each [n], first position): consecutive, oldest first.
    context: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
    # (aux_hidden [n, 3H], the token after each [n], the target's token after each [n], first position).
    scored: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]] = field(default_factory=list)

    def add(self, aux: torch.Tensor, following: torch.Tensor, start: int, target_tokens: torch.Tensor | None) -> None:
        """Rows at positions start..start+n-1; `target_tokens` None: keep them as context only."""
        self.context.append((aux, following, start))
        if target_tokens is not None:
            self.scored.append((aux, following, target_tokens, start))
            while sum(a.shape[0] for a, _, _, _ in self.scored[1:]) >= SCORE_POSITIONS:
                self.scored.pop(0)

    def score_rows(self, first_start: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(aux, following, target_next) of the rows to score: start t drafts x_{t+2}, the target's
        token after row t + 1 (the newest row's is not known yet: -1, no draft scored there).
        Without `first_start`, the newest SCORE_POSITIONS rows; with it, the rows from position
        first_start on, after SCORE_CONTEXT rows before them whose starts are not scored (-1)."""
        aux, following, target = (torch.cat(x) for x in list(zip(*self.scored))[:3])
        newest = self.scored[-1][3] + self.scored[-1][0].shape[0]  # one past the newest row's position
        keep = SCORE_POSITIONS if first_start is None else min(SCORE_POSITIONS, newest - first_start + SCORE_CONTEXT)
        aux, following, target = aux[-keep:], following[-keep:], target[-keep:]
        target_next = torch.cat([target[1:], target.new_full((1,), -1)])
        if first_start is not None:
            target_next[: max(0, aux.shape[0] - (newest - first_start))] = -1
        return aux, following, target_next


@torch.no_grad()
def head_score(
    head: Eagle3Head, aux: torch.Tensor, next_tokens: torch.Tensor, target_next: torch.Tensor, steps: int
) -> float:
    """The head's mean simulated accept length over a request's rows with `steps` drafts per start.
    aux [T, 3H] target states at positions t, next_tokens [T] the token at t + 1, target_next [T]
    the target's greedy choice for t + 2 (-1 where unknown: those starts and chains end there)."""
    mask = (target_next >= 0).unsqueeze(0)
    if not bool(mask.any()):
        return 1.0
    logits = ttt_logits(head, aux.unsqueeze(0).to(head.fc.weight.dtype), next_tokens.unsqueeze(0), steps)
    tau = simulated_tau_per_start(logits, head.hot_ids, target_next.unsqueeze(0), mask)
    return float((tau * mask).sum() / mask.sum())


def choose_head(scores: list[float], margin: float = FALLBACK_MARGIN, incumbent: int = 0) -> int:
    """scores[i] is head i's (0: the live head). The best other head replaces the incumbent only
    when it beats it by more than `margin`; ties and near-ties stay."""
    best = max(range(len(scores)), key=lambda i: (scores[i], i == incumbent, -i))
    return best if scores[best] > scores[incumbent] + margin else incumbent
