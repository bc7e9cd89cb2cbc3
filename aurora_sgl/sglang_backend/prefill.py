"""What the prefill hook keeps of one extend (prompt) batch, and how it becomes ring records.

The embedded engine records every prompt position it computes as `StepRecord(prefill=True)`
pieces of at most K+1 rows (`records.prompt_records`, shared with the engine); the trainer joins them with the decode
records of the same request (trainer.py `Stitcher`), and needs them: the draft head drafts from
the prompt's context. This module gives the SGLang backend the same contract.

Where SGLang 0.5.23 has the data: `EAGLEWorkerV2._forward_prefill_batch` runs the target extend
with FULL hidden capture (aux states [N, 3H] for all N computed tokens; `last_hidden_states` [N, H]
because the plugin keeps it, see capture.py) and then `_draft_extend_for_prefill`, which *replaces*
`batch.input_ids` with the draft's inputs: each request's extend tokens shifted left by one plus a
tail token -- the first sampled token, or for a chunked request that is not finished the next
prompt token (`_eagle_prefill_tail_tokens`). That shifted tensor is exactly our `next_tokens`, so
the hook reads `batch.input_ids` before and after the original call; nothing is recomputed.

Positions are absolute: request i's extend starts at `batch.prefix_lens[i]`, which counts both an
earlier chunk of a chunked prefill and a radix-cache hit. Chunked prefill therefore needs nothing
special: each chunk is recorded when it is computed and the Stitcher joins the chunks (the last row
of a chunk predicts the next chunk's first token). Prefix-cache hits: SGLang does not recompute the
cached part, so its hidden states do not exist in this step and nothing of it is recorded -- the
request's records start at its prefix length (the trainer sees a segment that starts mid-sequence,
the same as after a lost record). Recomputing them would cost a target forward we do not own.

Same discipline as the verify capture: inside the step only fixed-destination device copies on the
forward stream into a staging slot (sizes come from `extend_lens`, already on the host); the host
builds records at the next scheduler iteration (`drain`). A slot holds `max_rows` rows; a batch
with more keeps each request's *last* rows while room lasts (the rows next to the decode records)
and counts the rest in `rows_dropped`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aurora_sgl.records import NO_TOKEN, Outcome, StepRecord
from aurora_sgl.transport.signal_ring import RecordBatch

from .capture import Sequencer


@dataclass
class PrefillStep:
    """One extend batch as the hook sees it (device views; nothing copied yet)."""

    request_ids: list[str]
    starts: list[int]  # absolute position of each request's first computed token (= prefix len)
    lengths: list[int]  # computed (extend) tokens per request; rows are laid out request after request
    input_ids: torch.Tensor  # [N] the extend tokens
    next_ids: torch.Tensor  # [N] the token after each (shifted prompt + tail token)
    aux_hidden: torch.Tensor  # [N, A]
    final_hidden: torch.Tensor | None  # [N, H]
    draft_version: int = 0


@dataclass
class _PrefillSlot:
    inputs: torch.Tensor
    nexts: torch.Tensor
    aux: torch.Tensor
    final: torch.Tensor
    ready: object = None
    drained: object = None
    meta: dict = field(default_factory=dict)
    full: bool = False


def keep_plan(lengths: list[int], capacity: int) -> list[int]:
    """Rows kept per request: all while they fit, then the trailing rows that still fit, then 0."""
    out, left = [], capacity
    for n in lengths:
        m = min(n, left)
        out.append(m)
        left -= m
    return out


class PrefillStaging:
    """A few device slots of `max_rows` prompt rows each; records are pieces of `num_steps`+1 rows."""

    def __init__(
        self,
        max_rows: int,
        num_steps: int,
        aux_dim: int,
        hidden_dim: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        slots: int = 2,
        sequencer=None,
    ):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.max_rows, self.k = max_rows, num_steps
        self.sequencer = sequencer if sequencer is not None else Sequencer()
        z = dict(dtype=torch.long, device=self.device)
        self.slots = [
            _PrefillSlot(
                inputs=torch.zeros(max_rows, **z),
                nexts=torch.zeros(max_rows, **z),
                aux=torch.zeros(max_rows, aux_dim, dtype=dtype, device=self.device),
                final=torch.zeros(max_rows, hidden_dim, dtype=dtype, device=self.device),
                ready=torch.cuda.Event() if self.cuda else None,
                drained=torch.cuda.Event() if self.cuda else None,
            )
            for _ in range(slots)
        ]
        self._none = torch.full((1, num_steps), NO_TOKEN, **z)
        self._unreached = torch.full((1, num_steps), Outcome.NOT_REACHED, dtype=torch.int8, device=self.device)
        self._next = 0
        self.captured = self.staging_drops = self.skipped = self.rows_dropped = self.drained_records = 0

    # ---- inside the step (forward stream, no host sync) ---------------------------------------
    @torch.no_grad()
    def capture(self, step: PrefillStep) -> bool:
        total = sum(step.lengths)
        if total == 0:
            return False
        if step.final_hidden is None or step.aux_hidden.shape[0] < total:
            self.skipped += 1
            return False
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        if slot.full:
            self.staging_drops += 1
        if self.cuda:
            torch.cuda.current_stream(self.device).wait_event(slot.drained)
        kept = keep_plan(step.lengths, self.max_rows)
        pairs = [
            (slot.inputs, step.input_ids),
            (slot.nexts, step.next_ids),
            (slot.aux, step.aux_hidden),
            (slot.final, step.final_hidden),
        ]
        if sum(kept) == total:  # the common case: one copy per tensor
            for dst, src in pairs:
                dst[:total].copy_(src[:total])
        else:  # per request, its trailing rows
            src_at = dst_at = 0
            for n, m in zip(step.lengths, kept):
                if m:
                    for dst, src in pairs:
                        dst[dst_at : dst_at + m].copy_(src[src_at + n - m : src_at + n])
                src_at += n
                dst_at += m
            self.rows_dropped += total - sum(kept)
        if self.cuda:
            slot.ready.record()
        slot.meta = {
            "ids": list(step.request_ids),
            "lens": kept,
            "version": step.draft_version,
            "starts": [s + n - m for s, n, m in zip(step.starts, step.lengths, kept)],
            "seq": self.sequencer.next(),
        }
        slot.full = True
        self.captured += 1
        return True

    # ---- at the scheduler iteration -----------------------------------------------------------
    def ready_slots(self) -> list[_PrefillSlot]:
        return [sl for sl in self.slots if sl.full and (sl.ready is None or sl.ready.query())]

    def batch(self, slot: _PrefillSlot) -> RecordBatch:
        """The slot's prompt rows as one `RecordBatch` of pieces of at most K+1 rows (the ring's row
        limit, cut as `records.prompt_records` cuts them): one index gather per field from the
        request-after-request staging rows into [pieces, K+1, ...]; a short piece's padding rows
        repeat its last row and are never read. Draft fields are one constant row, expanded."""
        m, r = slot.meta, self.k + 1
        ids, positions, acc, index = [], [], [], []
        at = 0
        for rid, start, n in zip(m["ids"], m["starts"], m["lens"]):
            for s in range(0, n, r):
                e = min(n, s + r)
                ids.append(rid)
                positions.append(start + s)
                acc.append(e - s - 1)
                index += [at + min(s + j, e - 1) for j in range(r)]
            at += n
        p = len(ids)
        idx = torch.tensor(index, dtype=torch.long, device=slot.inputs.device)
        return RecordBatch(
            request_ids=ids,
            positions=positions,
            num_accepted=acc,
            draft_versions=[m["version"]] * p,
            draft_tokens=self._none.expand(p, self.k),
            target_tokens=self._none.expand(p, self.k),
            outcome=self._unreached.expand(p, self.k),
            input_tokens=slot.inputs.index_select(0, idx).view(p, r),
            next_tokens=slot.nexts.index_select(0, idx).view(p, r),
            aux_hidden=slot.aux.index_select(0, idx).view(p, r, -1),
            final_hidden=slot.final.index_select(0, idx).view(p, r, -1),
            prefill=True,
        )

    def records(self, slot: _PrefillSlot) -> list[StepRecord]:
        """The slot's prompt rows as prefill records of at most K+1 rows (views of `batch`)."""
        return self.batch(slot).records()
