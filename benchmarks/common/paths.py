"""Where things are: the checkout, and the shared datasets (`AURORA_DATASETS`, else `../shared/datasets`
beside the checkout, where this project's machines keep them)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def datasets_dir() -> Path:
    return Path(os.environ.get("AURORA_DATASETS") or REPO.parent / "shared" / "datasets")
