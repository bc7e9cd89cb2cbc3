"""aurora_sgl: online speculative decoding with a self-training EAGLE-3 draft head."""

from pathlib import Path

__version__ = "0.1.0"


def reference_model_path() -> str:
    """Directory of the built-in reference target model (loadable offline with transformers)."""
    return str(Path(__file__).resolve().parent / "reference_model")


def reference_head_path() -> str:
    """Offline-trained EAGLE-3 head for the reference model (benchmarks/reference/train_head.py)."""
    return str(Path(__file__).resolve().parent / "reference_heads" / "general")
