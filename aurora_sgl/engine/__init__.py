"""The embedded engine: target model, EAGLE-3 draft head, sampling and verification, and the
continuous-batching loop that ties them into one speculative step.

`from aurora_sgl.engine import Engine` is the public entry point (README's Python API)."""

from aurora_sgl.engine.engine import Engine, PromptTooLong, Request
from aurora_sgl.records import StepRecord

__all__ = ["Engine", "PromptTooLong", "Request", "StepRecord"]
