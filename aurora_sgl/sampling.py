"""Public import path of the sampling parameters (`from aurora_sgl.sampling import SamplingParams`);
the code lives with the engine in `aurora_sgl/engine/sampling.py`."""

from aurora_sgl.engine.sampling import SamplingParams, probs_from_logits

__all__ = ["SamplingParams", "probs_from_logits"]
