"""Faults the trainer can be told to inject (`TrainerConfig.inject`, e.g. ["nan@2", "corrupt@4"]),
so tests and `benchmarks/reliability.py` can check that the serving side survives a bad head:

  nan      every float tensor NaN (the guardrail refuses it; with `inject_bypass_guardrail` the
           engine's own checks must)
  random   weights redrawn at the trained weights' scale: finite, plausible, and useless
  corrupt  the real candidate, published with bytes flipped after the checksum was taken: what a
           torn or corrupted shared-memory buffer looks like to the engine, which must refuse it
"""

from __future__ import annotations

import torch


def finite_state(state: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def faulty_state(state: dict[str, torch.Tensor], fault: str | None, seed: int) -> dict[str, torch.Tensor]:
    """A copy of `state` with `fault` applied to its tensors (`corrupt` is applied by the store)."""
    out = {k: v.detach().clone() for k, v in state.items()}
    if fault == "nan":
        for t in out.values():
            if t.is_floating_point():
                t.fill_(float("nan"))
    elif fault == "random":
        gen = torch.Generator().manual_seed(seed)
        for t in out.values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * float(t.float().std().clamp(min=1e-3)))
    return out
