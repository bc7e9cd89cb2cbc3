"""Stitching ring records back into per-request training sequences."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

import torch

from aurora_sgl.records import first_rejection, is_prompt_record
from aurora_sgl.trainer.config import MIN_SEQUENCE_TOKENS
from aurora_sgl.training.batches import Sequence
from aurora_sgl.transport.signal_ring import RingRecord

# Rows before a cut's first new position kept as the head's context. Under a trainer budget they
# cost as much as trained rows: with cuts of 8 new positions, 32 rows of context took half the
# budget, 8 about a fifth, and learned more (benchmarks/README.md, traffic shift, "Tried after the
# average").
CUT_CONTEXT = 8


class _Segment:
    __slots__ = (
        "start",
        "next_position",
        "inputs",
        "aux",
        "final",
        "last_next",
        "rejected",
        "length",
        "last_seq",
        "source",
        "trained",
    )

    def __init__(self, rec: RingRecord):
        self.start = rec.position
        self.source = rec.source
        self.inputs, self.aux, self.final, self.rejected = [], [], [], []
        self.length = 0
        self.next_position: int | None = None
        self.last_next = 0
        self.last_seq = rec.seq
        # Loss positions 0..trained-1 went out already, in cuts of the open segment (cut()).
        self.trained = 0

    def add(self, rec: RingRecord) -> None:
        rows = rec.input_tokens.numel()
        self.inputs.append(rec.input_tokens.cpu())
        self.aux.append(rec.aux_hidden.cpu())
        self.final.append(rec.final_hidden.cpu())
        self.last_next = int(rec.next_tokens[rows - 1])
        self.length += rows
        self.last_seq = rec.seq
        rejected = first_rejection(rec.outcome)
        if rejected is not None:  # draft j (0-based) proposed the token at position + j + 1
            idx = rec.position + rejected + 1 - self.start
            if idx <= self.length:  # beyond that a truncated record no longer covers it
                self.rejected.append(idx)
        complete = rows == rec.num_accepted + 1  # the ring truncates long records
        self.next_position = rec.position + rec.num_accepted + 1 if complete else None

    def build(self, rejected_weight: float, context: int = CUT_CONTEXT) -> tuple[Sequence, torch.Tensor] | None:
        """Sequence of length L+1 (L recorded rows plus the final next token). The final token has
        no hidden state yet: its aux/final rows are zeros, used only at a position HeadBatch masks.
        Loss positions t = 0..L-2 (row t predicts token t + 2); after a cut only those from
        `trained` on, with at most `context` rows before them (as a prompt's rows are kept)."""
        n = self.length + 1
        if n < MIN_SEQUENCE_TOKENS or self.length - 1 <= self.trained:
            return None
        tokens = torch.cat(self.inputs + [torch.tensor([self.last_next], dtype=torch.long)])
        aux = torch.cat(self.aux + [self.aux[0].new_zeros(1, self.aux[0].shape[-1])])
        final = torch.cat(self.final + [self.final[0].new_zeros(1, self.final[0].shape[-1])])
        weights = torch.ones(n)
        for idx in self.rejected:
            if 0 <= idx < n:
                weights[idx] = 1.0 + rejected_weight
        if not self.trained:
            return Sequence(tokens=tokens, aux=aux, final=final, first_generated=0), weights
        start = max(0, self.trained - context)
        # HeadBatch trains position t when t + 2 >= first_generated.
        seq = Sequence(tokens[start:], aux[start:], final[start:], first_generated=self.trained - start + 2)
        return seq, weights[start:]

    def cut(self, rejected_weight: float) -> tuple[Sequence, torch.Tensor] | None:
        """The segment so far as a training sequence (its positions not yet handed out), while the
        request goes on: its newest row predicts a token not recorded yet, so it waits for the next."""
        built = self.build(rejected_weight)
        if built is not None:
            self.trained = self.length - 1
        return built


class Stitcher:
    """Joins consecutive records of one request into sequences.

    A record covers position..position+num_accepted and the next one of that request starts at
    position+num_accepted+1. A segment is closed (becomes a training sequence) when
      * the next record of its request leaves a gap (a lost or truncated record),
      * the next record would make it longer than `max_tokens`,
      * its request went quiet: every decoding request writes one record per engine step, so the
        records between two of one request's records are at most the batch size. A request absent
        for more than 2 x (the largest such gap among recent records) + 2 has missed at least two
        steps (finished or aborted) -- this needs no knowledge of the engine's batch size. (The
        open segments bound the batch size too, but under a stream of short requests finished
        ones pile up faster than that bound lets them go.)
      * or `close_all()` (the trainer calls it when the ring has been idle for a while).
    Records from several rings (`RingRecord.source`, one ring per SGLang DP replica) are counted per
    ring: sequence numbers of two rings are unrelated, and how the reader interleaves their records
    must not make a request look quiet.
    """

    def __init__(self, max_tokens: int = 512, rejected_weight: float = 2.0, prompt_tokens: int = -1):
        self.max_tokens = max_tokens
        self.rejected_weight = rejected_weight
        self.prompt_tokens = prompt_tokens
        # Prompt (prefill) records of requests that have not decoded yet, trimmed to the last
        # `prompt_tokens` positions; they join the request's segment with its first decode record.
        self._prompt: dict[int, deque[RingRecord]] = {}
        self._open: dict[int, _Segment] = {}
        self._done: deque[tuple[Sequence, torch.Tensor]] = deque()
        self._done_tokens = 0
        self._newest_seq: dict[int, int] = {}  # per source ring
        # per source ring: seq distance between consecutive records of a request
        self._gaps: dict[int, deque[int]] = {}

    @property
    def closed_tokens(self) -> int:
        """Recorded positions in closed segments, ready for training."""
        return self._done_tokens

    @property
    def open_tokens(self) -> int:
        return sum(s.length for s in self._open.values())

    def add(self, records: Iterable[RingRecord]) -> None:
        sources = set()
        for rec in records:
            src = rec.source
            sources.add(src)
            self._newest_seq[src] = max(self._newest_seq.get(src, -1), rec.seq)
            if rec.input_tokens.numel() == 0:
                continue
            key = rec.request_hash
            last = (
                self._open[key].last_seq
                if key in self._open
                else (self._prompt[key][-1].seq if key in self._prompt else None)
            )
            if last is not None:
                self._gaps.setdefault(src, deque(maxlen=256)).append(rec.seq - last)
            if self.prompt_tokens >= 0 and is_prompt_record(rec):
                self._buffer_prompt(key, rec)
                continue
            for held in self._prompt.pop(key, ()):
                self._add_one(held)
            self._add_one(rec)
        for src in sources:  # only a ring's own records make its requests look quiet
            self._close_quiet(src)

    def _close_quiet(self, src: int) -> None:
        newest = self._newest_seq[src]
        prompts = [k for k, q in self._prompt.items() if q[-1].source == src]
        opened = [k for k, s in self._open.items() if s.source == src]
        limit = 2 * (len(opened) + len(prompts))
        if self._gaps.get(src):
            limit = min(limit, 2 * max(self._gaps[src]) + 2)
        for key in [k for k in prompts if newest - self._prompt[k][-1].seq > limit]:
            self._flush_prompt(key)  # a request that ended right after its prompt
        # Re-read _open: flushing held prompt rows closes the request's open segment too, when it
        # has one (prompt rows arriving after the request decoded: it was prefilled again).
        for key in [k for k, s in self._open.items() if s.source == src and newest - s.last_seq > limit]:
            self._close(key)

    def _buffer_prompt(self, key: int, rec: RingRecord) -> None:
        held = self._prompt.setdefault(key, deque())
        if held and held[-1].position + held[-1].input_tokens.numel() != rec.position:
            held.clear()  # a gap: only the part next to the generated tokens matters
        held.append(rec)
        rows = sum(r.input_tokens.numel() for r in held)
        while held and rows - held[0].input_tokens.numel() >= self.prompt_tokens:
            rows -= held.popleft().input_tokens.numel()
        if not held:
            del self._prompt[key]

    def _flush_prompt(self, key: int) -> None:
        for held in self._prompt.pop(key, ()):
            self._add_one(held)
        if key in self._open:
            self._close(key)

    def _add_one(self, rec: RingRecord) -> None:
        rows = rec.input_tokens.numel()
        seg = self._open.get(rec.request_hash)
        if seg is not None and (seg.next_position != rec.position or seg.length + rows > self.max_tokens - 1):
            self._close(rec.request_hash)
            seg = None
        if seg is None:
            seg = self._open[rec.request_hash] = _Segment(rec)
        seg.add(rec)

    def _close(self, key: int) -> None:
        self._keep(self._open.pop(key).build(self.rejected_weight))

    def _keep(self, built: tuple[Sequence, torch.Tensor] | None) -> None:
        if built is not None:
            self._done.append(built)
            self._done_tokens += len(built[0].tokens) - 1

    def cut_open(self, min_new: int) -> int:
        """Hand out the open segments holding at least `min_new` positions not trained on yet, as
        sequences of their rows so far (the request is still running; its later rows follow in
        the next cut or when it closes). A trainer with nothing new to learn from otherwise waits
        for requests to finish, and right after a shift every request of the new domain is still
        running. Returns the number of sequences cut."""
        cut = 0
        for seg in self._open.values():
            if seg.length - 1 - seg.trained >= min_new:
                built = seg.cut(self.rejected_weight)
                self._keep(built)
                cut += built is not None
        return cut

    def close_all(self) -> None:
        for key in list(self._prompt):
            self._flush_prompt(key)
        for key in list(self._open):
            self._close(key)

    def take(self, max_tokens: int | None = None) -> list[tuple[Sequence, torch.Tensor]]:
        """Closed segments, oldest first, as (Sequence, weights) -- weights[j] weighs the prediction
        of token j, as HeadBatch.from_sequences expects. With `max_tokens`, stop once that many
        recorded positions are taken (the rest stays for the next call)."""
        out = []
        taken = 0
        while self._done and (max_tokens is None or taken < max_tokens):
            seq, w = self._done.popleft()
            n = len(seq.tokens) - 1
            taken += n
            self._done_tokens -= n
            out.append((seq, w))
        return out
