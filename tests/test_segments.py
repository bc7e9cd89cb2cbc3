"""Segments a SIGKILLed server leaves behind are swept by the next one; nothing else is touched."""

import os
import subprocess
import sys

from aurora_sgl.transport.segments import sweep_stale


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_sweep_removes_only_our_names_whose_owner_is_gone(tmp_path):
    shm, tmp = tmp_path / "shm", tmp_path / "tmp"
    shm.mkdir()
    tmp.mkdir()
    dead, alive = _dead_pid(), os.getpid()
    stale = [
        shm / f"aurora_ring_{dead}_0123456789ab",
        shm / f"aurora_ring_dp1_{dead}_0123456789ab",  # an SGLang DP replica's ring
        shm / f"aurora_weights_{dead}_0123456789ab",
        shm / f"aurora_trainer_{dead}_0123456789ab",
    ]
    kept = [
        shm / f"aurora_ring_{alive}_0123456789ab",
        shm / f"aurora_ring_dp3_{alive}_0123456789ab",
        shm / f"someone_else_{dead}_0123456789ab",
        shm / "aurora_ring_notapid",
    ]
    for f in stale + kept:
        f.write_bytes(b"x")
    stale_dir, live_dir = tmp / f"aurora_trainer_{dead}_abc123", tmp / f"aurora_sgl_{alive}_abc123"
    for d in (stale_dir, live_dir):
        d.mkdir()
        (d / "spec.json").write_text("{}")
    removed = sweep_stale(str(shm), str(tmp))
    assert sorted(removed) == sorted(str(p) for p in stale + [stale_dir])
    assert all(p.exists() for p in kept) and live_dir.exists()
    assert not any(p.exists() for p in stale) and not stale_dir.exists()
    assert sweep_stale(str(shm), str(tmp)) == []
