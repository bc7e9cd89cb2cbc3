"""Ring records against an eager recompute of the target: the check that what the capture wrote
into the signal ring is what the target computes at those positions.

For each request the caller knows its whole token sequence (prompt + output). One eager forward
of the target over it (our `TargetModel`, the embedded engine's layer-by-layer forward, with the
head's aux layers) gives the aux hidden states and the final normed hidden state at every
position; every ring row of the request -- prompt (prefill) rows and the accepted rows of each
verify step -- must sit at its position: the same input token, the same next token, the same
states within a tolerance (the server computes in bf16, the recompute in float32 when it fits).

Also checked: the rows of a request cover every position from its first computed one (its cached
prefix length; 0 without a radix hit) to the one before its last token (the last generated token
is never a verify input), with no position twice. Works on `StepRecord`s (the embedded engine's
`record_sink`) and `RingRecord`s (a ring reader) alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from aurora_sgl.engine.target import TargetModel
from aurora_sgl.records import is_prompt_record
from aurora_sgl.transport.signal_ring import ID_BYTES

# Relative L2 error per row (and per aux layer) allowed between the ring and the recompute: bf16
# serving against a float32 recompute of the reference model differs by ~1e-2 at most (measured on
# CPU with the embedded engine in bf16, tests/test_sglang_device_check.py); a row of another
# position or layer differs by ~1.
REL_TOL = 0.05


def ring_id(request_id: str) -> str:
    """The request id as the ring keeps it (its first 32 UTF-8 bytes)."""
    return request_id.encode()[:ID_BYTES].decode(errors="ignore")


@torch.no_grad()
def eager_states(target: TargetModel, tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux [T, len(aux) * H], final [T, H]) of `tokens` at positions 0..T-1, float32 on the CPU:
    one forward over the whole sequence (slot 0 of the target's cache)."""
    if len(tokens) > target.max_len:
        raise ValueError(f"sequence of {len(tokens)} tokens exceeds the recompute cache ({target.max_len})")
    dev = target.device
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=dev)
    pos = torch.arange(len(tokens), device=dev).unsqueeze(0)
    last = torch.tensor([len(tokens) - 1], device=dev)  # the lm_head on one row only: it is not compared
    out = target.forward(ids, pos, torch.zeros(1, dtype=torch.long, device=dev), logits_rows=last)
    return out.aux_hidden[0].float().cpu(), out.final_hidden[0].float().cpu()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row ||a - b|| / ||b|| (float32, a tiny floor on ||b||)."""
    a, b = a.float(), b.float()
    return (a - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-6)


@dataclass
class Comparison:
    """What the ring rows of some requests look like against the recompute."""

    records: int = 0
    prompt_rows: int = 0
    decode_rows: int = 0
    beyond: int = 0  # rows past the request's last token (a verify step cut by max_new_tokens)
    token_mismatches: int = 0  # input token != the sequence's token at that position
    next_mismatches: int = 0  # next token != the sequence's next token
    aux_err: list[float] = field(default_factory=list)  # max relative error per aux layer
    final_err: float = 0.0
    aux_abs: float = 0.0  # max absolute error, for the report
    final_abs: float = 0.0
    uncovered: int = 0  # positions expected but in no row
    duplicated: int = 0  # positions in more than one row
    bad_start: int = 0  # requests whose first row is not at their expected first position
    missing_requests: list[str] = field(default_factory=list)  # requests with no row at all
    first_problem: str = ""

    def problem(self, text: str) -> None:
        if not self.first_problem:
            self.first_problem = text

    def ok(self, tol: float = REL_TOL) -> bool:
        return (
            self.records > 0
            and not self.missing_requests
            and self.token_mismatches == self.next_mismatches == self.uncovered == self.duplicated == 0
            and self.bad_start == 0
            and max(self.aux_err, default=0.0) <= tol
            and self.final_err <= tol
        )

    def summary(self) -> str:
        aux = "/".join(f"{e:.3g}" for e in self.aux_err) or "-"
        s = (
            f"{self.records} records ({self.prompt_rows} prompt + {self.decode_rows} decode rows): "
            f"rel err aux {aux}, final {self.final_err:.3g} (abs {self.aux_abs:.3g} / {self.final_abs:.3g})"
        )
        bad = [
            f"{n} {what}"
            for n, what in (
                (self.token_mismatches, "input tokens differ"),
                (self.next_mismatches, "next tokens differ"),
                (self.uncovered, "positions uncovered"),
                (self.duplicated, "positions twice"),
                (self.bad_start, "requests start elsewhere"),
                (len(self.missing_requests), "requests without rows"),
            )
            if n
        ]
        if bad:
            s += "; " + ", ".join(bad)
        if self.beyond:
            s += f"; {self.beyond} rows past the output (not compared)"
        if self.first_problem:
            s += f"; first: {self.first_problem}"
        return s


def compare(
    records: Iterable,
    sequences: Mapping[str, Sequence[int]],
    states: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    n_aux: int,
    starts: Mapping[str, int] | None = None,
) -> Comparison:
    """Compare the rows of `records` belonging to `sequences` (request id -> prompt + output
    tokens) with `states` (request id -> `eager_states` of that sequence). `starts`: the first
    position each request's rows must begin at (default 0; a radix hit makes it the cached length)."""
    by_ring_id = {ring_id(rid): rid for rid in sequences}
    c = Comparison(aux_err=[0.0] * n_aux)
    seen: dict[str, list[int]] = {rid: [] for rid in sequences}
    for rec in records:
        rid = by_ring_id.get(rec.request_id) or by_ring_id.get(ring_id(rec.request_id))
        if rid is None:
            continue
        c.records += 1
        seq, (aux_ref, final_ref) = sequences[rid], states[rid]
        n = int(rec.input_tokens.shape[0])
        prompt = is_prompt_record(rec)
        for i in range(n):
            p = int(rec.position) + i
            if p >= len(seq):
                c.beyond += 1
                continue
            if prompt:
                c.prompt_rows += 1
            else:
                c.decode_rows += 1
            seen[rid].append(p)
            if int(rec.input_tokens[i]) != seq[p]:
                c.token_mismatches += 1
                c.problem(f"{rid} position {p}: input token {int(rec.input_tokens[i])}, sequence {seq[p]}")
            if p + 1 < len(seq) and int(rec.next_tokens[i]) != seq[p + 1]:
                c.next_mismatches += 1
                c.problem(f"{rid} position {p}: next token {int(rec.next_tokens[i])}, sequence {seq[p + 1]}")
        m = min(n, max(0, len(seq) - int(rec.position)))
        if m:
            _states(c, rec, aux_ref, final_ref, m, n_aux, rid)
    for rid, positions in seen.items():
        _coverage(c, rid, positions, len(sequences[rid]), (starts or {}).get(rid, 0))
    return c


def _states(c: Comparison, rec, aux_ref, final_ref, m: int, n_aux: int, rid: str) -> None:
    p0 = int(rec.position)
    aux, final = rec.aux_hidden[:m].float().cpu(), rec.final_hidden[:m].float().cpu()
    ref_a, ref_f = aux_ref[p0 : p0 + m], final_ref[p0 : p0 + m]
    if aux.shape != ref_a.shape or final.shape != ref_f.shape:
        c.aux_err = [float("inf")] * n_aux
        c.problem(f"{rid}: ring rows {tuple(aux.shape)} / {tuple(final.shape)}, recompute {tuple(ref_a.shape)}")
        return
    for j, (a, b) in enumerate(zip(aux.chunk(n_aux, dim=-1), ref_a.chunk(n_aux, dim=-1))):
        e = float(rel_err(a, b).max())
        if e > c.aux_err[j]:
            c.aux_err[j] = e
            if e > REL_TOL:
                c.problem(f"{rid} position {p0}: aux layer #{j} rel err {e:.3g}")
    e = float(rel_err(final, ref_f).max())
    if e > REL_TOL:
        c.problem(f"{rid} position {p0}: final hidden rel err {e:.3g}")
    c.final_err = max(c.final_err, e)
    c.aux_abs = max(c.aux_abs, float((aux - ref_a).abs().max()))
    c.final_abs = max(c.final_abs, float((final - ref_f).abs().max()))


def _coverage(c: Comparison, rid: str, positions: list[int], length: int, start: int) -> None:
    if not positions:
        c.missing_requests.append(rid)
        c.problem(f"{rid}: no rows in the ring")
        return
    if min(positions) != start:
        c.bad_start += 1
        c.problem(f"{rid}: first row at position {min(positions)}, expected {start}")
    counted = set(positions)
    c.duplicated += len(positions) - len(counted)
    missing = set(range(start, length - 1)) - counted
    c.uncovered += len(missing)
    if missing:
        c.problem(f"{rid}: positions {sorted(missing)[:5]} not in any row")
