"""Logprobs read off the target's logits at committed positions (SGLang 0.5.23's definitions), so
they are the target's whatever K and draft head. Requests come from engine.Engine; these functions
append to their logprob lists."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from aurora_sgl.engine.engine import Request


def add_output_logprobs(items: list[tuple[Request, torch.Tensor, int]]) -> None:
    """Logprobs of the tokens each request committed this step. `items`: (request, the
    target's logits rows for the step [T, V], len(output_ids) before the step); committed
    token j sits at row j. SGLang's sampler definition: log_softmax(logits / temperature),
    after temperature and before top-k/top-p (greedy: raw log_softmax), from the target's
    logits alone, so the values do not depend on K or on the draft head."""
    rows, temps, toks, spans = [], [], [], []
    for r, logits, before in items:
        new = r.output_ids[before:]  # a prefix of what was committed (stop strings may cut)
        if not new:
            continue
        rows.append(logits[: len(new)])
        temps.append(torch.full((len(new),), r.params.logprob_temperature, device=logits.device))
        toks += new
        spans.append((r, len(new)))
    if not spans:
        return
    lp = torch.log_softmax(torch.cat(rows).float() / torch.cat(temps).unsqueeze(1), dim=-1)
    _append(lp, toks, spans, "output")


def add_input_logprobs(
    reqs: list[Request], lens: list[int], final_hidden: torch.Tensor, lm_head: torch.nn.Module
) -> None:
    """Prompt logprobs for the requests that ask (logprob_start_len below the prompt length),
    computed over this chunk's rows they need only: SGLang's logits_processor definition, the
    raw log_softmax of the target's logits (no temperature). Entry for prompt token t > start
    is log p(x_t | x_<t), from row t - 1; the entry for token `start` is None (SGLang drops
    the last row, the sampling one, and puts None first)."""
    rows, toks, spans = [], [], []
    for i, (r, n) in enumerate(zip(reqs, lens)):
        start, size = r.input_logprob_start, len(r.prompt_ids)
        if start >= size:
            continue
        c0 = r.prefilled  # this chunk covers prompt positions c0 .. c0 + n - 1
        if c0 <= start < c0 + n:
            r.input_logprobs.append(None)
            if r.params.top_logprobs_num:
                r.input_top_logprobs.append(None)
            if r.params.token_ids_logprob is not None:
                r.input_token_ids_logprobs.append(None)
        lo, hi = max(start, c0), min(c0 + n, size - 1)  # rows lo..hi-1 predict tokens lo+1..hi
        if hi <= lo:
            continue
        rows.append(final_hidden[i, lo - c0 : hi - c0])
        toks += r.prompt_ids[lo + 1 : hi + 1]
        spans.append((r, hi - lo))
    if not spans:
        return
    _append(torch.log_softmax(lm_head(torch.cat(rows)).float(), dim=-1), toks, spans, "input")


def _append(lp: torch.Tensor, toks: list[int], spans: list[tuple[Request, int]], side: str) -> None:
    """Hand rows of logprobs [N, V] out to their requests' `side` ("input" / "output") lists:
    the chosen token's value, and the top alternatives and asked-for ids where requested."""
    lp.clamp_(min=torch.finfo(lp.dtype).min)
    chosen = lp.gather(1, torch.tensor(toks, device=lp.device).unsqueeze(1))[:, 0].tolist()
    top, ids = _top_and_ids(lp, [r for r, n in spans for _ in range(n)])
    at = 0
    for r, n in spans:
        getattr(r, f"{side}_logprobs").extend(chosen[at : at + n])
        if r.params.top_logprobs_num:
            getattr(r, f"{side}_top_logprobs").extend(top[at : at + n])
        if r.params.token_ids_logprob is not None:
            getattr(r, f"{side}_token_ids_logprobs").extend(ids[at : at + n])
        at += n


def _top_and_ids(lp: torch.Tensor, row_reqs: list[Request]) -> tuple[list, list]:
    """Per row of logprobs [N, V]: the request's top_logprobs_num alternatives as (values, ids)
    sorted by value, and the values at its token_ids_logprob (None where not asked)."""
    kmax = max(r.params.top_logprobs_num for r in row_reqs)
    top: list = [None] * len(row_reqs)
    if kmax:
        vals, idx = lp.topk(min(kmax, lp.shape[-1]), dim=-1)
        vals, idx = vals.tolist(), idx.tolist()
        for j, r in enumerate(row_reqs):
            k = r.params.top_logprobs_num
            if k:
                top[j] = (vals[j][:k], idx[j][:k])
    ids: list = [None] * len(row_reqs)
    for j, r in enumerate(row_reqs):
        want = r.params.token_ids_logprob
        if want is not None:
            ids[j] = lp[j, list(want)].tolist() if want else []
    return top, ids
