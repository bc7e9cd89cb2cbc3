"""The SGLang launcher's edges: `--checkpoint-dir` (created 0700 when missing, one-line error otherwise),
refusals before anything starts, and the end of serving (SGLang's processes killed)."""

from __future__ import annotations

import argparse
import os
import stat

from aurora_sgl.sglang_backend import launcher
from aurora_sgl.sglang_backend.launcher import main, prepare_checkpoint_dir


def test_missing_checkpoint_dir_is_created_0700(tmp_path):
    want = tmp_path / "runs" / "ckpt"
    root, error = prepare_checkpoint_dir(str(want))
    assert error is None and root == str(want)
    assert stat.S_IMODE(os.stat(want).st_mode) == 0o700
    (want / "keep").write_text("x")  # an existing, writable directory is accepted as it is
    assert prepare_checkpoint_dir(str(want)) == (str(want), None)
    assert prepare_checkpoint_dir(None) == (None, None)


def test_unusable_checkpoint_dir_is_one_line_error(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("x")
    assert "not a directory" in prepare_checkpoint_dir(str(f))[1]
    assert "cannot be created" in prepare_checkpoint_dir(str(f / "sub"))[1]
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        assert "not writable" in prepare_checkpoint_dir(str(ro))[1]
    elif os.path.isdir("/proc"):  # root writes through permission bits, not into procfs
        assert "not writable" in prepare_checkpoint_dir("/proc")[1]
    # the launcher stops before anything starts (it does not reach the CUDA preflight)
    args = argparse.Namespace(checkpoint_dir=str(f / "sub"))
    assert main(args, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --checkpoint-dir") and err.strip().count("\n") == 0


def test_multi_layer_eagle_is_refused_with_one_line_before_anything_starts(capsys):
    """Issue 13, defect 8: `--enable-multi-layer-eagle` selects a worker the plugin does not hook."""
    args = argparse.Namespace(checkpoint_dir=None)
    assert main(args, ["--mem-fraction-static", "0.7", "--enable-multi-layer-eagle"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--enable-multi-layer-eagle" in err and "CUDA" not in err


def test_draft_dir_without_weights_is_refused_with_one_line_before_anything_starts(tmp_path, capsys):
    """Issue 13, item 9: a draft directory the plugin and the trainer cannot load from is refused
    at the command line, not discovered later inside a scheduler (online training turned off)."""
    draft = tmp_path / "head"
    draft.mkdir()
    (draft / "config.json").write_text("{}")
    (draft / "training_args.bin").write_bytes(b"")  # not weights (SGLang skips it too)
    args = argparse.Namespace(checkpoint_dir=None, speculative_draft_model_path=str(draft))
    assert main(args, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(draft) in err and "pytorch_model.bin" in err and "CUDA" not in err
    (draft / "pytorch_model.bin").write_bytes(b"")  # a published head's layout passes this check
    assert launcher.draft_error(str(draft)) is None


def test_serving_ends_with_sglangs_processes_killed(tmp_path):
    """Ctrl-C (or a crash) while SGLang serves: like SGLang's own entry points, the launcher kills
    every process SGLang started -- schedulers left behind would hold the GPUs. Run in a child
    process: the cleanup kills every descendant of the process it runs in."""
    import signal
    import subprocess
    import sys

    import psutil

    script = f"""
import subprocess, sys
import sglang.launch_server
from aurora_sgl.sglang_backend import launcher

scheduler = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"],
    stdout=subprocess.DEVNULL,  # not this script's pipe: the test reads to its end
    stderr=subprocess.DEVNULL,
)
print(scheduler.pid, flush=True)

def run_server(server_args):
    raise KeyboardInterrupt  # Ctrl-C while serving

sglang.launch_server.run_server = run_server
try:
    launcher.serve(None, None, {str(tmp_path / "handoff")!r})
except KeyboardInterrupt:
    pass
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    pid = int(proc.stdout.split()[0])
    try:
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, "a process SGLang started outlived the launcher"
    finally:
        if psutil.pid_exists(pid):
            os.kill(pid, signal.SIGKILL)
