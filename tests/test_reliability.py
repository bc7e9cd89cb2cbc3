"""Short variants of benchmarks/reliability.py: the real server (online training on, checkpoints) under
mixed concurrent traffic, each fault once. Whatever happens to the trainer, the weight store or the
clients, no request fails and every greedy answer equals target-only decoding.

The committed figures (benchmarks/results/reliability.json) come from the script's own run with a
20-minute soak and 30 s SIGSTOP. Here the soak is 30 s (AURORA_SOAK_MINUTES=2 for the issue's
2-minute variant) and the SIGSTOP 5 s, to keep this file within its share of the CI budget on 2
cores; the code paths are the same, only the durations differ.
"""

import json
import os
import stat
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import reliability as rel  # noqa: E402

# Publish after every optimizer step of 256 tokens and checkpoint every publish, so that a short run
# trains, swaps and writes checkpoints.
FAST_TRAINER = json.dumps({"checkpoint_every": 1, "tokens_per_step": 256, "publish_every": 1})


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    args = rel.build_parser().parse_args(
        [
            "--soak-minutes",
            os.environ.get("AURORA_SOAK_MINUTES", "0.5"),
            "--fault-seconds",
            "12",
            "--sigstop-seconds",
            "5",
            "--concurrency",
            "4",
            "--pool-size",
            "12",
            "--trainer-config",
            FAST_TRAINER,
        ]
    )
    pool = rel.build_pool(args.pool_size)
    rel.attach_references(pool)
    b = rel.Bench(args, pool, tmp_path_factory.mktemp("reliability"))
    b.start_main()
    yield b
    if b.server is not None and b.server.proc.poll() is None:
        b.server.stop()


def _clean(r: dict) -> None:
    assert r["served"] > 0 and r["failed"] == 0 and r["differing_outputs"] == 0, r


def test_soak_mixed_traffic_is_exact(bench):
    r = bench.soak()
    _clean(r)
    assert r["compared_with_target_only"] > 0 and r["ring_written"] > 0, r
    assert r["rss_mb_end"]["server"] and r["rss_mb_end"]["trainer"]
    assert r["trainer_inet_sockets"] == 0  # the trainer takes no network input


def test_trainer_sigkill_under_load(bench):
    r = bench.trainer_sigkill()
    _clean(r)
    assert r["trainer_restarted"] and r["trainer_restarts"] == 1, r


def test_trainer_sigstop_under_load(bench):
    r = bench.trainer_sigstop()
    _clean(r)
    assert r["train_steps_while_stopped"] == 0 and r["trainer_restarts_while_stopped"] == 0, r
    assert r["trainer_alive"], r


def test_corrupt_published_buffer_is_refused(bench):
    r = bench.corrupt_buffer()
    _clean(r)
    assert r["corrupted_version_refused"] and r["refused_versions"] >= 1 and r["trainer_alive"], r


def test_failing_checkpoint_writes_under_load(bench):
    """A full checkpoint filesystem (a 64 KiB tmpfs). Without one, the script's fallback (a regular
    file where the directory should be) would make "nothing half-written left" true by
    construction, so the test is skipped instead (issue 17)."""
    if not rel.tmpfs_available():
        pytest.skip("a tmpfs cannot be mounted here (needs root and mount): no full filesystem to write to")
    r = bench.checkpoint_fault("checkpoint_full")
    assert r["mechanism"].startswith("tmpfs"), r["mechanism"]
    _clean(r)
    assert r["first_checkpoint_failure_s"] is not None and r["checkpoint_failures"] >= 1, r
    assert r["restart_s"] is not None and r["trainer_alive_after"], r
    assert r["files_left_in_checkpoint_dir"] == [], r  # no half-written checkpoint left behind


def test_clients_aborting_at_random_points(bench):
    r = bench.client_aborts()
    _clean(r)
    assert r["aborted_by_client"] > 0 and r["slots_freed"] and r["probe_after_exact"], r


def test_server_sigterm_mid_stream_then_restart_from_checkpoint(bench):
    ckpt = bench.ckpt
    r = bench.server_sigterm()
    _clean(r)
    assert r["load_until_sigterm"]["served"] > 0 and r["load_until_sigterm"]["failed"] == 0, r
    assert r["shm_segments_left"] == [] and r["trainer_stopped"] and not r["trainer_spec_dir_left"], r
    assert r["restart_resumed_from_newest_checkpoint"], r
    assert r["after_restart"]["served"] > 0 and r["after_restart"]["failed"] == 0, r
    # The checkpoint directory the trainer created is private, and so is everything in it.
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o700
    for path in ckpt.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o700 if path.is_dir() else 0o600), path
    assert os.listdir(ckpt)
