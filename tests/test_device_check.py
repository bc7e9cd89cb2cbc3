"""The GPU check script's CPU smoke mode, so the script a GPU session runs cannot rot."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_cpu_quick_mode(tmp_path):
    out = tmp_path / "check.json"
    p = subprocess.run(
        [str(ROOT / "launch" / "device_check.sh"), "--device", "cpu", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, AURORA_CHECK_JSON=str(out), OMP_NUM_THREADS="1"),
    )
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = {r["check"]: r for r in json.loads(out.read_text())}
    assert rows["engine lossless (T=0, K=4)"]["result"] == "PASS"
    assert rows["CUDA IPC ring + weight store (2 procs)"] == {
        "check": "CUDA IPC ring + weight store (2 procs)",
        "result": "skipped",
        "detail": "no CUDA",
    }
    assert rows["sglang capture staging"]["result"] == "PASS"
    assert rows["trainer on cpu + live swaps"]["result"] == "PASS"
    assert "0 outputs differ" in rows["trainer on cpu + live swaps"]["detail"]
    assert p.stdout.splitlines()[0].split() == ["check", "result", "detail"]  # the table
