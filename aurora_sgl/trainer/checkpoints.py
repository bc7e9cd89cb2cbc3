"""Trainer checkpoints: written atomically, pruned to the newest few, and found again after a
restart (the newest one that loads)."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from aurora_sgl.engine.draft_head import Eagle3Head

log = logging.getLogger("aurora_sgl.trainer")

_CKPT = re.compile(r"step_(\d{8,})\Z")


def _checkpoint_dirs(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    root = Path(checkpoint_dir)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _CKPT.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


def newest_checkpoint(checkpoint_dir: str | Path | None) -> str | None:
    """The newest `step_*` dir under `checkpoint_dir` that loads (config.json and
    model.safetensors present and accepted by Eagle3Head.load), or None."""
    if not checkpoint_dir:
        return None
    for _, path in _checkpoint_dirs(checkpoint_dir):
        if not (path / "config.json").is_file() or not (path / "model.safetensors").is_file():
            continue
        try:
            Eagle3Head.load(path, torch.zeros(0))  # the embedding is not needed to check the tensors
        except Exception as e:  # truncated / corrupt files, bad config: try the next older one
            log.warning("checkpoint %s does not load (%s); skipping it", path, str(e).splitlines()[0] if str(e) else e)
            continue
        return str(path)
    return None


def served_dtype(layout) -> str:
    """The dtype the engine serves the head in: that of the weight store's floating tensors (SGLang's
    draft module, or the embedded engine's). Checkpoints are saved in it, so a checkpoint served
    again (`--speculative-draft-model-path`, a restart) loads in the dtype it was trained for."""
    dtypes = {dtype for _, dtype in layout.values() if dtype.is_floating_point}
    if len(dtypes) != 1:
        raise ValueError(f"the weight store holds floating tensors of {len(dtypes)} dtypes, expected one")
    return str(dtypes.pop()).removeprefix("torch.")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(head: Eagle3Head, checkpoint_dir: str | Path, steps: int, state: dict, keep: int) -> Path:
    """Write `checkpoint_dir/step_<steps:08d>` atomically (temp dir + os.replace), files 0600,
    then prune to the newest `keep`. Raises on failure (the trainer counts it)."""
    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    final = root / f"step_{steps:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        head.save(tmp)
        (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2, default=str))
        for f in tmp.iterdir():
            os.chmod(f, 0o600)
            _fsync(f)
        os.chmod(tmp, 0o700)
        if final.exists():  # same step number again (e.g. a restart that did not resume the count)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(root, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in _checkpoint_dirs(root)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for p in root.glob(".tmp-step_*"):  # left behind by a crash mid-write
        if p != tmp:
            shutil.rmtree(p, ignore_errors=True)
    return final
