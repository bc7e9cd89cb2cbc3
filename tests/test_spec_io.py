"""Specs with CUDA IPC handles: JSON for what JSON can carry, a private pickle beside it for the rest."""

import json
import os
import stat

import pytest

from aurora_sgl.spec_io import read_spec, write_spec


def test_cuda_handles_travel_in_a_private_pickle_beside_the_json(tmp_path):
    handle = (print, (b"\x00ipc-handle", 7))  # the shape of reduce_tensor's (rebuild fn, args)
    spec = {"ring": {"name": "r", "cuda_payload": handle, "cuda_event": b"\x01evt"},
            "store": {"name": "s", "cuda_buffers": handle, "cuda_events": [b"a", b"b"]}, "threads": 1}
    path = tmp_path / "spec.json"
    write_spec(spec, str(path))
    plain = json.loads(path.read_text())
    assert plain == {"ring": {"name": "r"}, "store": {"name": "s"}, "threads": 1, "cuda_handles": "spec.json.cuda.pkl"}
    for f in (path, tmp_path / "spec.json.cuda.pkl"):
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o600
    assert read_spec(str(path)) == spec


def test_plain_specs_stay_plain_json_and_foreign_pickles_are_refused(tmp_path):
    path = tmp_path / "spec.json"
    write_spec({"ring": {"name": "r"}}, str(path))
    assert not (tmp_path / "spec.json.cuda.pkl").exists()
    assert read_spec(str(path)) == {"ring": {"name": "r"}}
    path.write_text(json.dumps({"cuda_handles": "../elsewhere.pkl"}))
    with pytest.raises(ValueError, match="beside the spec"):
        read_spec(str(path))
    (tmp_path / "x.pkl").write_bytes(b"")
    os.chmod(tmp_path / "x.pkl", 0o666)
    path.write_text(json.dumps({"cuda_handles": "x.pkl"}))
    with pytest.raises(ValueError, match="writable"):
        read_spec(str(path))
