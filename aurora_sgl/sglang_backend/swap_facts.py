"""What SGLang's live draft holds, in a few numbers a process outside the scheduler can check.

The plugin exports them with its counters (`counters_dp<D>_rank<T>.json`, key `swap_facts`) each time
the served draft changes -- a swap, a rollback, or the version SGLang loaded at start -- so that
`launch/device_check.sh --sglang` can tell, from outside the scheduler, that a published head
really reached SGLang's parameters and the hot-token map drafting indexes:

  * `params`: per SGLang draft parameter (the embedding and anything else shared with the target
    left out), a row-weighted sum `sum_r (r + 1) * sum(row r)` in float64 and the shape. A changed
    value, or rows moved within the parameter (q / k / v blocks of the fused `qkv_proj` in the
    wrong place, a permuted lm_head), changes it. `expected_params` computes the same from a
    published state, fused as SGLang fuses it.
  * `hot_digest` / `hot_head`: the same sum over the worker's hot-token map, and its first entries.
  * `hot_is_worker_tensor` (computed at each export, a pointer comparison): the map the swapper
    writes is the tensor the draft worker indexes (`EagleDraftWorker.hot_token_id`, created after
    the worker's __init__), not a stale copy.

Cost: one reduction per draft parameter, enqueued on the forward stream after the swap (so it
reads what the swap wrote and nothing later), and one non-blocking copy of a few float64 values
into pinned memory; the host reads them at a later export, once an event says they are there.
No host sync, and nothing per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext

import torch

from .swap import _FUSED, NOT_WEIGHTS, sglang_name

HOT_HEAD = 8  # entries of the hot map exported as they are
EMBED = "model.embed_tokens.weight"


CHUNK_ELEMENTS = 1 << 22  # a float64 reduction of a bf16 tensor casts its input first: 32 MB at a time


@torch.no_grad()
def row_fingerprint(t: torch.Tensor) -> torch.Tensor:
    """sum_r (r + 1) * sum(row r) of `t` viewed as [rows, -1], float64, a 0-d tensor on t's device.
    A float64 sum of a half-precision tensor can cast its whole input first (PyTorch's reductions
    cast inside the kernel only for bf16 / fp16 -> float32 on CUDA); on an 8B target's draft lm_head
    that copy would be 1 GB after SGLang sized its KV pool, so rows are reduced a chunk at a time."""
    rows = t.reshape(t.shape[0] if t.dim() else 1, -1)
    step = max(1, CHUNK_ELEMENTS // max(1, rows.shape[1]))
    sums = torch.cat([rows[i : i + step].sum(dim=1, dtype=torch.float64) for i in range(0, rows.shape[0], step)])
    return (sums * torch.arange(1, sums.numel() + 1, dtype=torch.float64, device=t.device)).sum()


def sglang_layout(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A head's serving state (our checkpoint names) as SGLang's draft holds it: q / k / v and
    gate / up concatenated into `qkv_proj` / `gate_up_proj`, SGLang's names; d2t / t2d left out."""
    out: dict[str, torch.Tensor] = {}
    blocks: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for name, t in state.items():
        if name in NOT_WEIGHTS:
            continue
        if name in _FUSED:
            target, idx = _FUSED[name]
            blocks.setdefault(target, []).append((idx, t))
        else:
            out[sglang_name(name)] = t
    for target, parts in blocks.items():
        out[target] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
    return out


def expected_params(state: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, list]:
    """{SGLang parameter: [fingerprint, shape]} of a published state, after the cast to the served
    `dtype` the store applies (the trainer's float32 becomes SGLang's bf16 on publish)."""
    out = {}
    for name, t in sglang_layout(state).items():
        t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        out[name] = [float(row_fingerprint(t)), list(t.shape)]
    return out


def hot_digest(hot: torch.Tensor) -> tuple[float, list[int]]:
    """(fingerprint, first entries) of a hot-token map, as the plugin exports them."""
    return float(row_fingerprint(hot)), [int(x) for x in hot[:HOT_HEAD].tolist()]


def differences(
    facts: dict, expected: dict, hot: tuple[float, list[int]] | None, skipped=(), rel: float = 1e-9
) -> list[str]:
    """What differs between the plugin's swap facts and the expected parameters / hot map. Not
    compared: parameters the swap skips (`skipped`: shared with the target), and shards (TP) or
    padded parameters, whose shapes differ from the published tensors."""
    out = []
    live = facts.get("params") or {}
    compared = 0
    for name, (fp, shape) in expected.items():
        if name in skipped:
            continue
        if name not in live:
            out.append(f"{name} not in the live draft")
            continue
        got, got_shape = live[name]
        if list(got_shape) != list(shape):
            continue
        compared += 1
        if abs(got - fp) > rel * max(1.0, abs(fp)):
            out.append(f"{name} fingerprint {got:.9g}, published {fp:.9g}")
    if not compared and expected:
        out.append("no parameter comparable (every shape differs)")
    if hot is not None:
        if facts.get("hot_digest") != hot[0] or facts.get("hot_head") != hot[1]:
            out.append(f"hot map {facts.get('hot_head')}..., published {hot[1]}...")
    return out


class SwapFacts:
    """The plugin runtime's facts about its live draft. `observe` runs at each counters export:
    when the served draft changed it enqueues the sums; it returns what is known by now."""

    def __init__(self):
        self._key = None
        self._pending = None  # (facts without values, shapes, has a hot map, pinned host values, event)
        self.last: dict = {}
        self.error: str | None = None  # set by the plugin after an error: no more facts

    @staticmethod
    def key(rt) -> tuple:
        c = rt.counters
        return (rt.draft_version, c.get("swaps"), c.get("failed_swaps"), c.get("probes"), c.get("rollbacks"))

    def observe(self, rt, stream=None) -> dict:
        sw = rt.swapper
        if sw is None:
            return {}
        worker_hot = sw._hot_of()
        bound = None if sw.hot is None or worker_hot is None else sw.hot.data_ptr() == worker_hot.data_ptr()
        key = self.key(rt)
        if key != self._key and self._pending is None:
            self._key = key
            self._enqueue(rt, sw, worker_hot, stream)
        self._collect()
        return {"hot_is_worker_tensor": bound, "swap_facts": self.last}

    @torch.no_grad()
    def _enqueue(self, rt, sw, hot, stream) -> None:
        skip = set(sw.skipped) | {EMBED}
        params = {n: p for n, p in sw.params.items() if n not in skip}
        with torch.cuda.stream(stream) if stream is not None else nullcontext():
            sums = [row_fingerprint(p.data) for p in params.values()]
            if hot is not None:
                sums.append(row_fingerprint(hot))
                sums += list(hot[:HOT_HEAD].to(torch.float64))
            if not sums:
                return
            values = torch.stack(sums)
            cuda = values.is_cuda
            host = torch.empty(values.shape, dtype=torch.float64, pin_memory=cuda)
            host.copy_(values, non_blocking=cuda)
            event = None
            if cuda:
                event = torch.cuda.Event()
                event.record()
        shapes = {n: list(p.shape) for n, p in params.items()}
        facts = {"version": rt.draft_version, "swaps": rt.counters.get("swaps", 0)}
        self._pending = (facts, shapes, hot is not None, host, event)

    def _collect(self) -> None:
        if self._pending is None:
            return
        facts, shapes, has_hot, host, event = self._pending
        if event is not None and not event.query():
            return  # not there yet: a later export reads it
        values = host.tolist()
        facts["params"] = {n: [values[i], shape] for i, (n, shape) in enumerate(shapes.items())}
        if has_hot:
            facts["hot_digest"] = values[len(shapes)]
            facts["hot_head"] = [int(v) for v in values[len(shapes) + 1 :]]
        self.last = facts
        self._pending = None
