"""Sampling controls that depend on the text generated so far -- SGLang 0.5.23's penalizers and its
logit bias -- applied to the target's logits.

Under speculation one target forward scores K + 1 positions, and row j of a request's logits
continues the committed output plus the first j drafts. Each row is therefore controlled as if
those drafts had already been generated: a K = 0 decoder that had produced the same prefix would
see exactly these logits, which is what makes greedy output identical to K = 0 and sampling exact
(verification only ever compares drafts against the controlled distribution).

SGLang's order and definitions (sglang/srt/sampling/penaltylib, sampling_batch_info.py):
  frequency   logits -= frequency_penalty * count(token in output)
  min tokens  stop tokens (eos and stop_token_ids) get -inf while the output is shorter than
              min_new_tokens
  presence    logits -= presence_penalty * (token in output)
  repetition  for tokens in the output: logits / penalty where positive, logits * penalty where
              negative
  logit bias  logits += bias[token] (after any grammar mask)
Only generated tokens count, never the prompt's (SGLang's penalizers start empty).
"""

from __future__ import annotations

import torch

from aurora_sgl.engine.sampling import SamplingParams


def has_controls(p: SamplingParams) -> bool:
    return bool(
        p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1.0 or p.min_new_tokens or p.logit_bias
    )


def controlled_logits(
    logits: torch.Tensor,
    p: SamplingParams,
    output_ids: list[int],
    drafts: list[int],
    stop_ids: set[int],
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """logits [L, V] for one request, row j continuing output_ids + drafts[:j] (L <= len(drafts) + 1).
    `allowed` [L, V] bool: a grammar's mask per row (engine/grammar.py), applied after the
    penalizers and before the logit bias, as SGLang does. Returns new float32 logits."""
    rows, vocab = logits.shape
    out = logits.float().clone()
    dev = out.device
    if p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1.0:
        counts = _counts(output_ids, drafts[: rows - 1], rows, vocab, dev)
        if p.frequency_penalty:
            out -= p.frequency_penalty * counts
        if p.presence_penalty:
            out -= p.presence_penalty * (counts > 0)
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            scaled = torch.where(out > 0, out / p.repetition_penalty, out * p.repetition_penalty)
            out = torch.where(seen, scaled, out)
    before_min = None
    if p.min_new_tokens and stop_ids:
        short = [j for j in range(rows) if len(output_ids) + j < p.min_new_tokens]
        if short:
            before_min = out.clone() if allowed is not None else None
            ids = torch.tensor(sorted(i for i in stop_ids if i < vocab), device=dev)
            out[torch.tensor(short, device=dev).unsqueeze(1), ids.unsqueeze(0)] = float("-inf")
    if allowed is not None:
        out = out.masked_fill(~allowed, float("-inf"))
        if before_min is not None:
            # A finished grammar allows only the stop token, which min_new_tokens forbids: the
            # grammar wins (SGLang would have nothing left to sample).
            dead = ~torch.isfinite(out).any(-1)
            if bool(dead.any()):
                out[dead] = before_min[dead].masked_fill(~allowed[dead], float("-inf"))
    if p.logit_bias:
        ids = torch.tensor(list(p.logit_bias), device=dev)
        out[:, ids] += torch.tensor(list(p.logit_bias.values()), device=dev)
    return out


def _counts(output_ids: list[int], drafts: list[int], rows: int, vocab: int, dev) -> torch.Tensor:
    """[rows, vocab] occurrences of each token in output_ids + drafts[:j], row j."""
    base = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab).float().to(dev)
    counts = base.expand(rows, vocab).clone()
    if rows > 1 and drafts:
        seen = torch.nn.functional.one_hot(torch.tensor(drafts, device=dev), vocab).float().cumsum(0)
        counts[1 : len(drafts) + 1] += seen
    return counts
