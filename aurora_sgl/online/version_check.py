"""What the serving side accepts from the weight store, for both backends (the embedded flywheel and
the SGLang plugin): a published version is taken only if its bytes match the checksum the trainer
published and every float tensor is finite. A refused version is reported to the trainer as a
rollback, so it goes back to the weights before it."""

from __future__ import annotations

import torch

SUPERSEDED = "superseded"  # a newer publish began while we looked: not a fault, look again next step


@torch.no_grad()
def refusal_reason(store, version: int, views: list[torch.Tensor]) -> str | None:
    """None if `version` may be served; SUPERSEDED if the answer is unknowable now; else why not.
    On CUDA the caller picks the stream: the checksum and the sums sync with the host."""
    intact = store.verify(version)
    if intact is None:
        return SUPERSEDED
    if not intact:
        return "checksum mismatch"
    # A float32 sum propagates NaN and overflows on absurd magnitudes: one cheap pass finds both
    # (a bf16 sum would overflow on honest weights). Accumulating in float32 inside the reduction
    # makes no float32 copy of the tensor: on SGLang's GPU, sized before we allocate, an 8B
    # target's lm_head copy would be half a gigabyte.
    try:
        sums = [torch.sum(v, dtype=torch.float32) for v in views if v.is_floating_point()]
        finite = not sums or bool(torch.stack(sums).isfinite().all())
    except torch.OutOfMemoryError:
        return SUPERSEDED  # look again at the next step; serving is not the place to fail
    if not finite:
        return "non-finite weights"
    return None
