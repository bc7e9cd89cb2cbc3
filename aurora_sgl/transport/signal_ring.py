"""Signal ring: a bounded shared-memory ring of engine step records, one writer, one reader.

The serving engine writes one slot per `StepRecord` and never waits: when the ring is full it
overwrites the oldest slot. The trainer sidecar (another process) reads in sequence order and
discovers what it missed itself, because the writer cannot know what was consumed.

Segment layout (`/dev/shm/<prefix>_<pid>_<hex>`, mode 0600):
    header   16 int64: magic, sizes, write_seq, drops, truncated
    meta     capacity x 16 int64: seq_begin, request hash, position, num_accepted, n_rows,
             draft_version, request id (32 bytes), seq_end, flags (bit 0: prompt rows)
    payload  capacity x slot: input/next tokens [T], draft/target tokens [K], outcome [K] int8,
             aux_hidden [T, A] float32, final_hidden [T, H] float32 (fields 64-byte aligned)
On CUDA the payload is a device tensor shared once through CUDA IPC; header and meta stay in the
segment, so sequence numbers are always plain host memory.

Consistency is a per-slot seqlock: the writer stores seq_begin, then the payload, then seq_end,
then write_seq. A batch of n records claims its n consecutive slots at once (their seq_begin words
in one store pass), then writes each payload field for all n with one copy (two when the slot range
wraps past the ring's end), then publishes every seq_end, then write_seq: the per-step work is per
field, not per record (`write_batch`; `write_many` stacks records into one `RecordBatch`).

The reader copies a slot only if seq_begin == seq_end == the expected seq and checks both again
after the copy; a mismatch means the slot was torn or overwritten and is counted as a drop. With one
writer this is enough on CPython on x86-64: numpy/torch element stores are aligned 8-byte stores,
the three phases (claim, payload, publish) happen in separate C calls (no compiler reordering
across them) and x86's total store order makes them visible in program order while loads are not
reordered with other loads. A weakly ordered CPU (ARM) would need explicit fences.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from aurora_sgl.transport.segments import AttachedSegment, SharedSegment, align_up, create_segment

if TYPE_CHECKING:
    from aurora_sgl.records import StepRecord

ID_BYTES = 32
_MAGIC = 0x52494E4731  # "RING1"

# header words
_H_MAGIC, _H_CAPACITY, _H_MAX_TOKENS, _H_AUX, _H_HIDDEN, _H_K, _H_WRITE_SEQ, _H_DROPS, _H_TRUNCATED = range(9)
_HEADER_WORDS = 16
# meta words per slot; the request id occupies words 6..9
_M_SEQ_BEGIN, _M_HASH, _M_POSITION, _M_ACCEPTED, _M_ROWS, _M_VERSION, _M_ID = range(7)
_M_SEQ_END = _M_ID + ID_BYTES // 8
# A record of prompt rows (prefill) is told apart by this flag, not by its lack of drafts: a decode
# step at K = 0 (adaptive K), or a tree step that accepted nothing, drafts nothing either.
_M_FLAGS = _M_SEQ_END + 1
_FLAG_PREFILL = 1
_META_WORDS = 16


def request_hash(request_id: str) -> int:
    """Stable across processes (Python's hash() is salted per process), as a signed int64."""
    return int.from_bytes(hashlib.blake2b(request_id.encode(), digest_size=8).digest(), "little", signed=True)


# ---- the ring ---------------------------------------------------------------------------------
@dataclass
class RingRecord:
    """What the reader gets back: copies, rows truncated to the ring's max_tokens."""

    seq: int
    request_id: str  # the first 32 UTF-8 bytes of the engine's id
    request_hash: int  # of the full id, so records of one request join even when ids share a prefix
    position: int
    num_accepted: int
    draft_version: int
    draft_tokens: torch.Tensor  # [K] int64
    target_tokens: torch.Tensor  # [K] int64
    outcome: torch.Tensor  # [K] int8
    input_tokens: torch.Tensor  # [n] int64, n = min(num_accepted + 1, max_tokens)
    next_tokens: torch.Tensor  # [n] int64
    aux_hidden: torch.Tensor  # [n, A] float32
    final_hidden: torch.Tensor  # [n, H] float32
    prefill: bool = False  # prompt rows (StepRecord.prefill)
    source: int = 0  # which ring of a `RingSet` it came from: sequence numbers are per ring


def _payload_fields(t: int, k: int, aux_dim: int, hidden_dim: int):
    """(name, dtype, per-slot shape, byte offset) for each payload field, and the slot size."""
    fields, off = [], 0
    for name, dtype, shape in (
        ("input_tokens", torch.int64, (t,)),
        ("next_tokens", torch.int64, (t,)),
        ("draft_tokens", torch.int64, (k,)),
        ("target_tokens", torch.int64, (k,)),
        ("outcome", torch.int8, (k,)),
        ("aux_hidden", torch.float32, (t, aux_dim)),
        ("final_hidden", torch.float32, (t, hidden_dim)),
    ):
        fields.append((name, dtype, shape, off))
        off = align_up(off + int(np.prod(shape)) * dtype.itemsize)
    return fields, off


def _meta_end(capacity: int) -> int:
    """Byte offset of the payload: header and meta, aligned."""
    return align_up(_HEADER_WORDS * 8 + capacity * _META_WORDS * 8)


# The ring's size, one rule for both backends: at most RING_RECORDS records (several seconds of
# traffic at full batch, what a trainer that fell behind can still catch) and at most
# RING_PAYLOAD_BYTES of payload (on a GPU the payload is device memory beside SGLang's KV pool:
# an 8B target's record, 6 rows of 3H + H float32, is ~0.4 MB, so ~1300 records).
RING_RECORDS = 4096
RING_PAYLOAD_BYTES = 512 << 20


def ring_capacity(max_tokens_per_record: int, aux_dim: int, hidden_dim: int, k: int) -> int:
    _, slot_bytes = _payload_fields(max_tokens_per_record, k, aux_dim, hidden_dim)
    return max(64, min(RING_RECORDS, RING_PAYLOAD_BYTES // slot_bytes))


_FIXED_FIELDS = ("draft_tokens", "target_tokens", "outcome")
_ROW_FIELDS = ("input_tokens", "next_tokens", "aux_hidden", "final_hidden")


def _copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """The one primitive that copies payload into ring slots (both write paths; tests count it)."""
    dst.copy_(src)


@dataclass
class RecordBatch:
    """n records as one tensor per field, record after record: what `SignalRing.write_batch` copies
    into n consecutive slots with one copy per field. Row fields are padded to a common row count R
    (at least every record's min(num_accepted + 1, max_tokens)); padding rows land in the slots but
    are never read (each slot's row count is in its meta words). Tensors may be on any device and
    in any dtype the payload copy converts (bf16 states into the float32 payload); a field equal
    across the batch may be a stride-0 `expand` of one row."""

    request_ids: list[str]
    positions: list[int]
    num_accepted: list[int]
    draft_versions: list[int]
    draft_tokens: torch.Tensor  # [n, K]
    target_tokens: torch.Tensor  # [n, K]
    outcome: torch.Tensor  # [n, K] int8
    input_tokens: torch.Tensor  # [n, R]
    next_tokens: torch.Tensor  # [n, R]
    aux_hidden: torch.Tensor  # [n, R, A]
    final_hidden: torch.Tensor  # [n, R, H]
    prefill: bool | list[bool] = False  # per record; one bool is every record's

    def __post_init__(self) -> None:
        if isinstance(self.prefill, bool):
            self.prefill = [self.prefill] * len(self.request_ids)

    def __len__(self) -> int:
        return len(self.request_ids)

    def tail(self, m: int) -> RecordBatch:
        """The last m records (views)."""
        j = len(self) - m
        return RecordBatch(
            **{f.name: getattr(self, f.name)[j:] for f in dataclasses.fields(self)},
        )

    def records(self) -> list[StepRecord]:
        """The batch as `StepRecord`s: views, rows [0, num_accepted + 1) of each record."""
        from aurora_sgl.records import StepRecord

        r_max = self.input_tokens.shape[1]
        out = []
        for i, (rid, pos, a, v) in enumerate(
            zip(self.request_ids, self.positions, self.num_accepted, self.draft_versions)
        ):
            n = min(a + 1, r_max)
            out.append(
                StepRecord(
                    request_id=rid,
                    position=pos,
                    draft_tokens=self.draft_tokens[i],
                    target_tokens=self.target_tokens[i],
                    outcome=self.outcome[i],
                    num_accepted=a,
                    committed=[],
                    input_tokens=self.input_tokens[i, :n],
                    next_tokens=self.next_tokens[i, :n],
                    aux_hidden=self.aux_hidden[i, :n],
                    final_hidden=self.final_hidden[i, :n],
                    draft_version=v,
                    prefill=bool(self.prefill[i]),
                )
            )
        return out


def _rows_of_one_tensor(parts: list[torch.Tensor], r: int | None) -> torch.Tensor | None:
    """[n, *shape] (rows cut to r) as a strided view, no copy, when the parts are evenly spaced
    views of one tensor with equal strides -- the engine's per-request views of its batch tensors
    (`out.aux_hidden[i, :a + 1]`), or one shared tensor (spacing 0). A row past a part's own is
    whatever the base holds there (padding, never read); the view stays inside the base's storage.
    None when the parts are laid out otherwise."""
    p0, n = parts[0], len(parts)
    if n < 2 or p0.dim() == 0:
        return None
    ptr, item = p0.data_ptr(), p0.element_size()
    step_bytes = parts[1].data_ptr() - ptr
    if step_bytes < 0 or step_bytes % item:
        return None
    if [p.data_ptr() for p in parts] != [ptr + i * step_bytes for i in range(n)]:
        return None
    strides, tail = p0.stride(), p0.shape[1:]
    if any(p.stride() != strides for p in parts) or any(p.dtype != p0.dtype for p in parts):
        return None
    if tail and any(p.shape[1:] != tail for p in parts):
        return None
    rows = p0.shape[0] if r is None else r
    storage = p0.untyped_storage()
    if parts[-1].untyped_storage().data_ptr() != storage.data_ptr():
        return None
    shape = (n, rows, *tail)
    stride = (step_bytes // item, *strides)
    last = (ptr - storage.data_ptr()) // item + sum((d - 1) * st for d, st in zip(shape, stride))
    if (last + 1) * item > storage.nbytes():
        return None
    return p0.as_strided(shape, stride, p0.storage_offset())


def stack_records(records: Sequence[StepRecord], max_rows: int | None = None) -> RecordBatch:
    """`StepRecord`s (tensors on one device) as a `RecordBatch`, at most one gather per field: a
    field whose per-record tensors are evenly spaced views of one tensor (the engine's records) is
    a strided view of it, no copy; otherwise the fixed-width fields are stacked and the row fields
    stacked when every record has the same row count, else concatenated and scattered into a
    zero-padded [n, R, ...] (one index copy). Rows past `max_rows` (the ring's max_tokens) are
    left out, as the ring truncates them."""
    n = len(records)
    acc = [r.num_accepted for r in records]
    rows = [a + 1 if max_rows is None else min(a + 1, max_rows) for a in acc]
    r_max = max(rows)
    out = {}
    for name in _FIXED_FIELDS:
        parts = [getattr(r, name) for r in records]
        view = _rows_of_one_tensor(parts, None)
        out[name] = view if view is not None else torch.stack(parts)
    uniform = all(x == r_max for x in rows)
    dst = None
    for name in _ROW_FIELDS:
        whole = [getattr(r, name) for r in records]
        view = _rows_of_one_tensor(whole, r_max)
        if view is not None:
            out[name] = view
            continue
        parts = [t[:x] for t, x in zip(whole, rows)]
        if uniform:
            out[name] = torch.stack(parts)
            continue
        flat = torch.cat(parts)
        if dst is None:  # flat row -> padded row, shared by the four row fields
            dst = torch.tensor([i * r_max + j for i, x in enumerate(rows) for j in range(x)], device=flat.device)
        padded = flat.new_zeros((n * r_max, *flat.shape[1:]))
        padded.index_copy_(0, dst, flat)
        out[name] = padded.view(n, r_max, *flat.shape[1:])
    return RecordBatch(
        request_ids=[r.request_id for r in records],
        positions=[int(r.position) for r in records],
        num_accepted=acc,
        draft_versions=[int(r.draft_version) for r in records],
        prefill=[bool(r.prefill) for r in records],
        **out,
    )


class SignalRing(SharedSegment):
    """Create with `SignalRing.create` (the writer), open elsewhere with `SignalRing.attach(spec)`
    (the reader). One writer and one reader per ring."""

    def __init__(
        self,
        seg: SharedMemory | AttachedSegment,
        spec: dict,
        writer: bool,
        payload: torch.Tensor | None = None,
        event: Any = None,
    ):
        self._seg, self._spec, self._writer, self._event = seg, spec, writer, event
        self.capacity, self.max_tokens, self.k = spec["capacity"], spec["max_tokens"], spec["k"]
        self.device = torch.device(spec["device"])
        cap = self.capacity
        self._header = np.ndarray((_HEADER_WORDS,), np.int64, buffer=seg.buf)
        self._meta = np.ndarray((cap, _META_WORDS), np.int64, buffer=seg.buf, offset=_HEADER_WORDS * 8)
        self._ids = self._meta.view(np.uint8)[:, _M_ID * 8 : _M_ID * 8 + ID_BYTES]
        fields, slot_bytes = _payload_fields(self.max_tokens, self.k, spec["aux_dim"], spec["hidden_dim"])
        if payload is None:
            payload = torch.frombuffer(seg.buf, dtype=torch.uint8, count=cap * slot_bytes, offset=_meta_end(cap))
        payload = payload.view(cap, slot_bytes)
        # Built once: every write and read indexes these views, so steady state allocates no buffers.
        self._f = {
            name: payload[:, off : off + int(np.prod(shape)) * dtype.itemsize].view(dtype).view(cap, *shape)
            for name, dtype, shape, off in fields
        }
        self._write_seq = int(self._header[_H_WRITE_SEQ])
        # A reader starts at the oldest record still held; what was overwritten before it existed
        # is not its drop.
        self._next_seq = max(0, self._write_seq - cap)
        self._owns_name = writer

    @classmethod
    def create(
        cls,
        name_prefix: str,
        capacity_records: int,
        max_tokens_per_record: int,
        aux_dim: int,
        hidden_dim: int,
        k: int,
        device: str | torch.device = "cpu",
    ) -> SignalRing:
        for arg, value in (
            ("capacity_records", capacity_records),
            ("max_tokens_per_record", max_tokens_per_record),
            ("aux_dim", aux_dim),
            ("hidden_dim", hidden_dim),
            ("k", k),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{arg} must be a positive integer, got {value!r}")
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, got {device}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        _, slot_bytes = _payload_fields(max_tokens_per_record, k, aux_dim, hidden_dim)
        on_host = device.type == "cpu"
        payload_bytes = capacity_records * slot_bytes if on_host else 0
        seg = create_segment(name_prefix, _meta_end(capacity_records) + payload_bytes)
        spec = {
            "name": seg.name,
            "capacity": capacity_records,
            "max_tokens": max_tokens_per_record,
            "aux_dim": aux_dim,
            "hidden_dim": hidden_dim,
            "k": k,
            "dtype": "float32",
            "device": str(device),
        }
        header = np.ndarray((_HEADER_WORDS,), np.int64, buffer=seg.buf)
        header[:_H_WRITE_SEQ] = (_MAGIC, capacity_records, max_tokens_per_record, aux_dim, hidden_dim, k)
        del header  # a live view would keep the segment from closing
        payload = event = None
        if not on_host:
            from torch.multiprocessing.reductions import reduce_tensor

            payload = torch.zeros(capacity_records * slot_bytes, dtype=torch.uint8, device=device)
            event = torch.cuda.Event(interprocess=True)
            spec["cuda_payload"] = reduce_tensor(payload)  # picklable (not JSON) on this path
            spec["cuda_event"] = event.ipc_handle()
        return cls(seg, spec, writer=True, payload=payload, event=event)

    @classmethod
    def attach(cls, spec: dict) -> SignalRing:
        seg = AttachedSegment(spec["name"])
        header = np.ndarray((_HEADER_WORDS,), np.int64, buffer=seg.buf)
        expected = (_MAGIC, spec["capacity"], spec["max_tokens"], spec["aux_dim"], spec["hidden_dim"], spec["k"])
        ok = tuple(int(x) for x in header[:_H_WRITE_SEQ]) == expected
        del header
        if not ok:
            seg.close()
            raise ValueError(f"segment {spec['name']} does not hold a signal ring with this spec")
        payload = event = None
        if "cuda_payload" in spec:
            rebuild, args = spec["cuda_payload"]
            payload = rebuild(*args)
            event = torch.cuda.Event.from_ipc_handle(payload.device, spec["cuda_event"])
        return cls(seg, spec, writer=False, payload=payload, event=event)

    def stats(self) -> dict[str, int]:
        h = self._header
        return {"written": int(h[_H_WRITE_SEQ]), "drops": int(h[_H_DROPS]), "truncated": int(h[_H_TRUNCATED])}

    # ---- writer -----------------------------------------------------------------------------
    def write_many(self, records: Sequence[StepRecord]) -> None:
        """Copy records into the ring; never blocks. Records beyond the last `capacity` of one call
        get sequence numbers but no slot: the reader counts them as drops. The records are stacked
        into one `RecordBatch` (one gather per field) and written with `write_batch`."""
        if not self._writer:
            raise RuntimeError("only the process that created the ring writes to it")
        for r in records:  # all checks first: a bad record must not leave torn slots behind
            self._check(r)
        n = len(records)
        if n == 0:
            return
        if n == 1:  # nothing to batch: the per-record path has less fixed cost
            self._write_each(records)
            return
        kept = min(n, self.capacity)  # the older ones are never stacked: they get no slot
        self._write_batch(stack_records(records[n - kept :], self.max_tokens), skipped=n - kept)

    def write_batch(self, batch: RecordBatch) -> None:
        """Write n records given as one tensor per field (`RecordBatch`) into n consecutive slots:
        the slots are claimed together, each field is copied with one copy (two where the slot range
        wraps past the ring's end; plus one device<->host copy when the batch is not on the ring's
        device), then all n records are published. Same semantics as `write_many`."""
        if not self._writer:
            raise RuntimeError("only the process that created the ring writes to it")
        n = len(batch)
        if n == 0:
            return
        kept = min(n, self.capacity)
        self._write_batch(batch if kept == n else batch.tail(kept), skipped=n - kept)

    def _check(self, r: StepRecord) -> None:
        if r.draft_tokens.numel() != self.k:
            raise ValueError(f"record has {r.draft_tokens.numel()} draft tokens, the ring was made for k={self.k}")
        rows = r.num_accepted + 1
        for name, want in (("aux_hidden", self._spec["aux_dim"]), ("final_hidden", self._spec["hidden_dim"])):
            t = getattr(r, name)
            if t.dim() != 2 or t.shape[0] < min(rows, self.max_tokens) or t.shape[1] != want:
                raise ValueError(f"record {name} has shape {tuple(t.shape)}, expected [{rows}, {want}]")

    def _check_batch(self, b: RecordBatch, rows: np.ndarray) -> None:
        m = len(b)
        for name in ("positions", "num_accepted", "draft_versions", "prefill"):
            if len(getattr(b, name)) != m:
                raise ValueError(f"batch has {m} request ids but {len(getattr(b, name))} {name}")
        for name in _FIXED_FIELDS:
            if tuple(getattr(b, name).shape) != (m, self.k):
                shape = tuple(getattr(b, name).shape)
                raise ValueError(f"batch {name} has shape {shape}, expected [{m}, k={self.k}]")
        need = int(rows.max())
        for name, tail in (
            ("input_tokens", ()),
            ("next_tokens", ()),
            ("aux_hidden", (self._spec["aux_dim"],)),
            ("final_hidden", (self._spec["hidden_dim"],)),
        ):
            shape = tuple(getattr(b, name).shape)
            if len(shape) != 2 + len(tail) or shape[0] != m or shape[1] < need or shape[2:] != tail:
                raise ValueError(f"batch {name} has shape {shape}, expected [{m}, >={need}, *{list(tail)}]")

    def _write_batch(self, b: RecordBatch, skipped: int) -> None:
        """Write the m <= capacity records of `b` as sequence numbers write_seq + skipped + j."""
        cap, m = self.capacity, len(b)
        acc = np.asarray(b.num_accepted, dtype=np.int64)
        rows = np.minimum(acc + 1, self.max_tokens)
        self._check_batch(b, rows)  # before any slot is claimed: a bad batch leaves no torn slot
        s0 = self._write_seq
        seqs = np.arange(s0 + skipped, s0 + skipped + m, dtype=np.int64)
        first = int(seqs[0]) % cap
        runs = [(first, 0, min(m, cap - first))]  # (slot, batch offset, length): at most two runs
        if m > cap - first:
            runs.append((0, cap - first, m - (cap - first)))
        slots = seqs % cap
        meta = self._meta
        # Claim: from this store on, a reader copying any of these slots sees seq_begin != its seq.
        meta[slots, _M_SEQ_BEGIN] = seqs
        meta[slots, _M_HASH:_M_ID] = np.stack(
            (
                np.fromiter((request_hash(x) for x in b.request_ids), np.int64, m),
                np.asarray(b.positions, dtype=np.int64),
                acc,
                rows,
                np.asarray(b.draft_versions, dtype=np.int64),
            ),
            axis=1,
        )
        meta[slots, _M_FLAGS] = np.asarray(b.prefill, dtype=bool) * _FLAG_PREFILL
        ids = b"".join(x.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0") for x in b.request_ids)
        self._ids[slots] = np.frombuffer(ids, np.uint8).reshape(m, ID_BYTES)
        truncated = int((acc + 1 > self.max_tokens).sum())
        if truncated:
            self._header[_H_TRUNCATED] += truncated
        r_w = min(b.input_tokens.shape[1], self.max_tokens)  # rows copied per slot, padding included
        whole = len(runs) == 1
        for name in _FIXED_FIELDS + _ROW_FIELDS:
            src, dst = getattr(b, name), self._f[name]
            if name in _ROW_FIELDS and r_w != self.max_tokens:
                dst = dst[:, :r_w]
            if name in _ROW_FIELDS and src.shape[1] != r_w:
                src = src[:, :r_w]
            if src.device != self.device:
                src = src.to(self.device)  # the one device<->host copy of this field
            if whole:
                _copy_into(dst[first : first + m], src)
                continue
            for at, off, length in runs:
                _copy_into(dst[at : at + length], src[off : off + length])
        if self._event is not None:
            # Recorded before any seq_end is published: a reader that sees seq_end and then waits
            # on this event waits for the payload copies still queued on the stream.
            self._event.record()
        meta[slots, _M_SEQ_END] = seqs  # publish
        self._write_seq = s0 + skipped + m
        self._header[_H_WRITE_SEQ] = self._write_seq

    def _write_each(self, records: Sequence[StepRecord]) -> None:
        """The per-record write path batching replaced (one claim and seven copies per record):
        kept as the reference the batched path is tested and benchmarked against."""
        for r in records:
            self._check(r)
        s0, n = self._write_seq, len(records)
        kept = range(max(0, n - self.capacity), n)
        for j in kept:
            self._write_payload(s0 + j, records[j])
        if self._event is not None:
            self._event.record()
        for j in kept:
            self._meta[(s0 + j) % self.capacity, _M_SEQ_END] = s0 + j
        self._write_seq = s0 + n
        self._header[_H_WRITE_SEQ] = self._write_seq

    def _write_payload(self, seq: int, r: StepRecord) -> None:
        i = seq % self.capacity
        meta = self._meta[i]
        meta[_M_SEQ_BEGIN] = seq
        rows = r.num_accepted + 1
        if rows > self.max_tokens:
            rows = self.max_tokens
            self._header[_H_TRUNCATED] += 1
        meta[_M_HASH:_M_ID] = (request_hash(r.request_id), r.position, r.num_accepted, rows, r.draft_version)
        meta[_M_FLAGS] = _FLAG_PREFILL if r.prefill else 0
        self._ids[i] = np.frombuffer(r.request_id.encode()[:ID_BYTES].ljust(ID_BYTES, b"\0"), np.uint8)
        f = self._f
        for name in _FIXED_FIELDS:
            _copy_into(f[name][i], getattr(r, name))
        for name in _ROW_FIELDS:
            _copy_into(f[name][i, :rows], getattr(r, name)[:rows])

    # ---- reader -----------------------------------------------------------------------------
    def read(self, max_records: int) -> list[RingRecord]:
        """Up to `max_records` new records in sequence order (copies). Records overwritten before
        or during the copy are skipped and added to the shared `drops` counter."""
        if self._writer:
            raise RuntimeError("the ring's creator writes; read from a ring opened with SignalRing.attach")
        if not isinstance(max_records, int) or max_records < 1:
            raise ValueError(f"max_records must be a positive integer, got {max_records!r}")
        cap, first = self.capacity, self._next_seq
        write_seq = int(self._header[_H_WRITE_SEQ])
        if write_seq - first > cap:  # lapped: everything older than the last `capacity` is gone
            self._header[_H_DROPS] += write_seq - cap - first
            first = write_seq - cap
        stop = min(write_seq, first + max_records)
        if self._event is not None:
            torch.cuda.current_stream(self.device).wait_event(self._event)
        staged = []
        for seq in range(first, stop):
            meta = self._meta[seq % cap].copy()
            if meta[_M_SEQ_BEGIN] != seq or meta[_M_SEQ_END] != seq:
                continue
            i, rows = seq % cap, int(meta[_M_ROWS])
            staged.append(
                (
                    seq,
                    meta,
                    {name: (v[i, :rows] if name in _ROW_FIELDS else v[i]).clone() for name, v in self._f.items()},
                )
            )
        if self._event is not None:
            torch.cuda.current_stream(self.device).synchronize()  # the copies must be done before the re-check
        out = []
        for seq, meta, t in staged:
            now = self._meta[seq % cap]
            if now[_M_SEQ_BEGIN] != seq or now[_M_SEQ_END] != seq:
                continue
            ident = meta.view(np.uint8)[_M_ID * 8 : _M_ID * 8 + ID_BYTES].tobytes().rstrip(b"\0")
            out.append(
                RingRecord(
                    seq=seq,
                    request_id=ident.decode(errors="ignore"),
                    request_hash=int(meta[_M_HASH]),
                    position=int(meta[_M_POSITION]),
                    num_accepted=int(meta[_M_ACCEPTED]),
                    draft_version=int(meta[_M_VERSION]),
                    prefill=bool(meta[_M_FLAGS] & _FLAG_PREFILL),
                    **t,
                )
            )
        lost = (stop - first) - len(out)
        if lost:
            self._header[_H_DROPS] += lost
        self._next_seq = stop
        return out

    # ---- lifetime ---------------------------------------------------------------------------
    def _drop_views(self) -> None:
        self._header = self._meta = self._ids = self._f = None
