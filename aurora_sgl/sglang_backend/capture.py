"""What the verify hook keeps of one EAGLE-3 verify step, and how it becomes ring records.

Inside `EAGLEWorkerV2.verify` nothing may wait for the GPU, and the verify outputs are views into
the CUDA graph's static buffers that the next replay overwrites. So the hook only enqueues
fixed-size copies, on the forward stream, into a slot of a small device staging ring
(`CaptureStaging`): for each request the first S = num_steps + 1 rows of its block (the accepted
chain is there, topk > 1 included once SGLang compacted the path), the accept length (also into
pinned host memory), and host metadata SGLang already has on the CPU (request ids, seq lens).
Copying S rows per request whatever was accepted keeps every size known on the host.

`drain()` runs at the next scheduler iteration: a slot whose event has completed becomes one
`RecordBatch` (one tensor per field for all its requests, rows [0, accept_len) of each meaningful)
written into consecutive `SignalRing` slots on a side stream with one copy per field.
Why a staging ring in front of the signal ring: the signal ring needs the row count of every record
on the host (its meta words, truncation), and that is a device value during verify. Why not drain
inside the step: the accept lengths reach the host only after the step. Both costs are one
enqueue in the step and a host memcpy of `bs` ints per iteration. A slot the host has not drained
when the hook needs it again is overwritten and counted (`staging_drops`): the writer never waits.

Final hidden state: the trainer's contract (ring field `final_hidden`, a frozen lm_head copy in the
trainer) is the embedded backend's. In EAGLE-3 mode SGLang's `logits_output.hidden_states` holds
only the aux layers, but its `LogitsProcessor` can also return the post-norm last-layer states as
`last_hidden_states` (`keep_last_hidden_states`, normally set only for
--enable-return-aux-hidden-states, which turns speculation off). The plugin sets that flag on the
target's logits processor after the model loads, before graphs are captured, so the graph keeps the
tensor it already computed as an output and the decode graph runner returns it: no extra kernel in
the graph. We prefer this over the alternative (verify logits reduced to top-k draft-vocab
probabilities in the hook) because it keeps one contract for both backends and costs no top-k /
softmax kernel inside the step. `last_hidden_states` is not compacted by SGLang for topk > 1, so
its rows are gathered here with `accept_index`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from aurora_sgl.records import NO_TOKEN, Outcome, StepRecord
from aurora_sgl.transport.signal_ring import RecordBatch


@dataclass
class VerifyStep:
    """Tensors of one verify step as SGLang 0.5.23 leaves them after `run_eagle_verify`
    (device tensors under CUDA; the hook passes views, nothing is copied yet)."""

    request_ids: list[str]
    positions: list[int]  # per request: position of the root (last committed) token = seq_lens
    root_tokens: torch.Tensor  # [bs] the verify input's first token per request
    draft_tokens: torch.Tensor | None  # [bs, D] the verify input (None: not available)
    predict: torch.Tensor  # [bs*D] target tokens, accepted path compacted to the front for topk > 1
    accept_lens: torch.Tensor  # [bs] accepted drafts + 1
    accept_index: torch.Tensor  # [bs, S] global row of each accepted node (-1 padded)
    aux_hidden: torch.Tensor  # [bs*D, A] compacted like predict
    final_hidden: torch.Tensor | None  # [>= bs*D, H] NOT compacted (gathered with accept_index)
    topk: int
    draft_version: int = 0
    # Draft steps of this verify (SGLang's adaptive speculation changes it per batch, 0 included);
    # None: the staging's maximum.
    num_steps: int | None = None
    # [bs] device seq_lens (= root positions), copied like the accept lengths: under overlap
    # scheduling the host mirror can lag or be absent, the device tensor is what verify used.
    seq_lens: torch.Tensor | None = None


@dataclass
class _Slot:
    inputs: torch.Tensor
    nexts: torch.Tensor
    drafts: torch.Tensor
    aux: torch.Tensor
    final: torch.Tensor
    accept_dev: torch.Tensor  # int64 on the device: the pinned copy below must not convert dtypes
    accept_host: torch.Tensor  # pinned on CUDA
    pos_dev: torch.Tensor  # int64 root positions on the device (from seq_lens)
    pos_host: torch.Tensor  # pinned on CUDA
    ready: object = None  # CUDA event: the copies into this slot are done
    drained: object = None  # CUDA event: the ring copies out of this slot are done
    meta: dict = field(default_factory=dict)
    full: bool = False


class CaptureStaging:
    """A few device slots, each sized for `max_requests` requests of S rows."""

    def __init__(
        self,
        max_requests: int,
        num_steps: int,
        aux_dim: int,
        hidden_dim: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        slots: int = 4,
        sequencer: Sequencer | None = None,
    ):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.max_requests, self.k, self.s = max_requests, num_steps, num_steps + 1
        self.slots = []
        for _ in range(slots):
            z = dict(dtype=torch.long, device=self.device)
            self.slots.append(
                _Slot(
                    inputs=torch.zeros(max_requests, self.s, **z),
                    nexts=torch.zeros(max_requests, self.s, **z),
                    drafts=torch.full((max_requests, num_steps), -1, **z),
                    aux=torch.zeros(max_requests, self.s, aux_dim, dtype=dtype, device=self.device),
                    final=torch.zeros(max_requests, self.s, hidden_dim, dtype=dtype, device=self.device),
                    accept_dev=torch.zeros(max_requests, **z),
                    accept_host=torch.zeros(max_requests, dtype=torch.long, pin_memory=self.cuda),
                    pos_dev=torch.zeros(max_requests, **z),
                    pos_host=torch.zeros(max_requests, dtype=torch.long, pin_memory=self.cuda),
                    ready=torch.cuda.Event() if self.cuda else None,
                    drained=torch.cuda.Event() if self.cuda else None,
                )
            )
        self._next = 0  # slot the next capture writes
        self.sequencer = sequencer if sequencer is not None else Sequencer()
        self.captured = self.staging_drops = self.skipped = self.drained_records = 0
        self.max_batch = 0  # the most requests one captured verify step had (the device check reads it)

    # ---- inside the step (forward stream, no host sync) ---------------------------------------
    @torch.no_grad()
    def capture(self, step: VerifyStep) -> bool:
        bs = len(step.request_ids)
        if bs == 0:
            return False
        if bs > self.max_requests or step.final_hidden is None:
            self.skipped += 1
            return False
        slot = self.slots[self._next]
        self._next = (self._next + 1) % len(self.slots)
        if slot.full:  # the host never drained it: overwrite, the writer does not wait
            self.staging_drops += 1
        if self.cuda:  # the previous ring copies out of this slot must finish first (GPU-side wait)
            torch.cuda.current_stream(self.device).wait_event(slot.drained)
        d = step.predict.numel() // bs  # verify rows per request
        # This step's drafts (fewer than the maximum under SGLang's adaptive speculation) and the
        # rows that can hold its accepted chain; rows past them are padding the drain never reads.
        k = min(self.k if step.num_steps is None else step.num_steps, self.k)
        w = min(d, k + 1)
        pred = step.predict.view(bs, d)
        slot.nexts[:bs, :w].copy_(pred[:, :w])
        slot.inputs[:bs, 0].copy_(step.root_tokens)
        slot.inputs[:bs, 1:w].copy_(pred[:, : w - 1])  # an accepted draft equals the target's token
        if step.topk == 1 and step.draft_tokens is not None:
            slot.drafts[:bs, :k].copy_(step.draft_tokens.view(bs, d)[:, 1 : k + 1])
        else:  # tree: only the accepted path is known per request; the drain masks the rest
            slot.drafts[:bs, :k].copy_(pred[:, :k])
        slot.aux[:bs, :w].copy_(step.aux_hidden[: bs * d].view(bs, d, -1)[:, :w])
        rows = step.accept_index[:, :w].clamp(min=0).reshape(-1)
        slot.final[:bs, :w].copy_(step.final_hidden.index_select(0, rows).view(bs, w, -1))
        slot.accept_dev[:bs].copy_(step.accept_lens)
        slot.accept_host[:bs].copy_(slot.accept_dev[:bs], non_blocking=self.cuda)  # async D2H into pinned memory
        if step.seq_lens is not None:
            slot.pos_dev[:bs].copy_(step.seq_lens)
            slot.pos_host[:bs].copy_(slot.pos_dev[:bs], non_blocking=self.cuda)
        if self.cuda:
            slot.ready.record()
        slot.meta = {
            "ids": list(step.request_ids),
            "positions": list(step.positions),
            "bs": bs,
            "topk": step.topk,
            "drafted": k,
            "version": step.draft_version,
            "seq": self.sequencer.next(),
            "device_positions": step.seq_lens is not None,
        }
        slot.full = True
        self.captured += 1
        self.max_batch = max(self.max_batch, bs)
        return True

    # ---- at the scheduler iteration -----------------------------------------------------------
    def ready_slots(self) -> list[_Slot]:
        """Filled slots whose copies have completed, oldest first (never waits)."""
        out = [sl for sl in self.slots if sl.full and (sl.ready is None or sl.ready.query())]
        return sorted(out, key=lambda sl: sl.meta["seq"])

    def batch(self, slot: _Slot) -> RecordBatch:
        """A completed slot as one `RecordBatch`: the staging tensors are already [bs, S, ...] per
        field, so the per-request work is host metadata only; the masks (outcome, target tokens,
        tree drafts) are a few batched ops on the device whatever bs is. Rows past a request's
        accepted chain are padding the ring writes but never reads."""
        m = slot.meta
        bs, k, drafted = m["bs"], self.k, m.get("drafted", self.k)
        acc = [max(1, min(int(n), drafted + 1)) - 1 for n in slot.accept_host[:bs].tolist()]  # accepted drafts
        positions = slot.pos_host[:bs].tolist() if m.get("device_positions") else m["positions"]
        nexts, dev = slot.nexts[:bs], slot.nexts.device
        a = (slot.accept_dev[:bs].clamp(1, drafted + 1) - 1).unsqueeze(1)  # the same values, on the device
        j = torch.arange(k, device=dev).unsqueeze(0)
        reached, drafts = j <= a, slot.drafts[:bs]
        if drafted < k:  # a step of fewer drafts (adaptive) never reaches the positions past them
            reached = reached & (j < drafted)
            drafts = torch.where(j < drafted, drafts, NO_TOKEN)
        outcome = torch.where(j < a, Outcome.ACCEPTED, torch.where(reached, Outcome.REJECTED, Outcome.NOT_REACHED))
        target = torch.where(reached, nexts[:, :k], NO_TOKEN)  # the target's token at each reached draft
        if m["topk"] > 1:  # tree: the rejected sibling set is not one token
            drafts = torch.where(j < a, drafts, NO_TOKEN)
        return RecordBatch(
            request_ids=list(m["ids"]),
            positions=[int(p) for p in positions],
            num_accepted=acc,
            draft_versions=[m["version"]] * bs,
            draft_tokens=drafts,
            target_tokens=target,
            outcome=outcome.to(torch.int8),
            input_tokens=slot.inputs[:bs],
            next_tokens=nexts,
            aux_hidden=slot.aux[:bs],
            final_hidden=slot.final[:bs],
        )

    def records(self, slot: _Slot) -> list[StepRecord]:
        """One record per request of a completed slot: the rows of its accepted chain (views)."""
        return self.batch(slot).records()

    def drain(self, ring, stream=None) -> int:
        """Write every completed slot into `ring` (see `drain_in_order`)."""
        return drain_in_order([self], ring, stream)


class Sequencer:
    """One step counter shared by the verify and prefill stagings: the drain writes their slots in
    step order, so a request's prompt records reach the ring before its first decode record."""

    def __init__(self):
        self._n = 0

    def next(self) -> int:
        self._n += 1
        return self._n - 1


def drain_in_order(stagings, ring, stream=None) -> int:
    """Write every completed slot of `stagings` into `ring`, oldest step first; returns the records
    written. On CUDA the copies run on `stream` (not the forward stream) and never block the host."""
    ready = sorted(
        ((sl.meta["seq"], i, sl) for i, st in enumerate(stagings) for sl in st.ready_slots()), key=lambda t: t[:2]
    )
    written = 0
    for _, i, slot in ready:
        st = stagings[i]
        if st.cuda:
            with torch.cuda.stream(stream):
                batch = st.batch(slot)
                ring.write_batch(batch)
                slot.drained.record()
        else:
            batch = st.batch(slot)
            ring.write_batch(batch)
        slot.full = False
        written += len(batch)
        st.drained_records += len(batch)
    return written
