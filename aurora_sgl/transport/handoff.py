"""Process handoff: JSON, plus CUDA IPC handles in a pickle file beside it.

Segment specs are JSON, but a CUDA-resident ring payload or weight-store buffer is shared through
`torch.multiprocessing.reductions.reduce_tensor`, whose handle is a (rebuild function, args) pair
that only pickle can carry, and an IPC event handle is bytes. `write_handoff` moves every such entry
(`CUDA_KEYS`, at any depth) into `<path>.cuda.pkl`, written 0600 like the JSON, and leaves
`"cuda_handles": "<file name>"` in the JSON; `read_handoff` puts them back. Unpickling runs code, so
the reader only loads the file named by the JSON, from the JSON's own directory, and only when it
is owned by this user and not writable by anyone else.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
from typing import Any

CUDA_KEYS = ("cuda_payload", "cuda_event", "cuda_buffers", "cuda_events")


def _split(obj: Any, path: tuple, out: dict) -> Any:
    if isinstance(obj, dict):
        plain = {}
        for k, v in obj.items():
            if k in CUDA_KEYS:
                out[json.dumps(list(path) + [k])] = v
            else:
                plain[k] = _split(v, path + (k,), out)
        return plain
    return obj


def _write_private(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # readers never see a half-written file


def write_handoff(spec: dict, path: str) -> None:
    handles: dict = {}
    plain = _split(spec, (), handles)
    if handles:
        pkl = os.path.basename(path) + ".cuda.pkl"
        _write_private(os.path.join(os.path.dirname(os.path.abspath(path)), pkl), pickle.dumps(handles))
        plain["cuda_handles"] = pkl
    _write_private(path, json.dumps(plain).encode())


def read_handoff(path: str) -> dict:
    with open(path) as f:
        spec = json.load(f)
    pkl = spec.pop("cuda_handles", None)
    if not pkl:
        return spec
    if os.path.basename(pkl) != pkl:
        raise ValueError(f"cuda_handles must name a file beside the spec, got {pkl!r}")
    full = os.path.join(os.path.dirname(os.path.abspath(path)), pkl)
    st = os.stat(full)
    if st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise ValueError(f"{full} must be owned by this user and writable by nobody else")
    with open(full, "rb") as f:
        handles = pickle.load(f)
    for key, value in handles.items():
        *parents, last = json.loads(key)
        node = spec
        for p in parents:
            node = node[p]
        node[last] = value
    return spec
