"""Issue 13, item 10: the trainer's default GPU is the first one SGLang's server leaves free."""

from __future__ import annotations

import pytest

from aurora_sgl.sglang_backend.gpus import pick_trainer_device, server_gpus


def test_server_gpus_follow_sglang_placement():
    assert server_gpus(1) == [0]
    assert server_gpus(2) == [0, 1]
    assert server_gpus(2, dp=2) == [0, 1, 2, 3]  # replica d starts at d * tp * pp
    assert server_gpus(2, base=1) == [1, 2]
    assert server_gpus(2, dp=2, step=2) == [0, 2, 4, 6]
    assert server_gpus(2, pp=2) == [0, 1, 2, 3]
    assert server_gpus(4, nnodes=2) == [0, 1]  # this node's half of the TP group


@pytest.mark.parametrize(
    "used, count, want",
    [
        ([0], 1, "cuda:0"),  # one GPU: shared (with a warning)
        ([0], 2, "cuda:1"),
        ([0, 1], 2, "cuda:1"),  # TP 2 on two GPUs: shared, never a GPU that does not exist
        ([0, 1], 4, "cuda:2"),  # TP 2: cuda:1 is the server's
        ([0, 1, 2, 3], 8, "cuda:4"),  # TP 2 x DP 2
        ([2, 3], 4, "cuda:0"),  # --base-gpu-id 2 leaves the first GPUs free
    ],
)
def test_default_is_the_first_free_gpu_else_the_servers_last_with_a_warning(used, count, want):
    got = pick_trainer_device(used, count)
    assert got.device == want and got.error is None
    shared = int(want.split(":")[1]) in used
    assert (got.warning is not None) == shared
    if shared:
        assert "\n" not in got.warning and want in got.warning


def test_requested_device_is_kept_or_refused_with_one_line():
    assert pick_trainer_device([0, 1], 4, "cuda:1").device == "cuda:1"  # the user's choice, even shared
    assert pick_trainer_device([0], 1, "cpu").device == "cpu"
    for bad in ("cuda:2", "cuda:7"):
        got = pick_trainer_device([0], 2, bad)
        assert got.device is None and bad in got.error and "2 GPU(s)" in got.error and "\n" not in got.error
    assert pick_trainer_device([0], 2, "gpu:1").device is None
    assert pick_trainer_device([0], 0).device is None  # nothing to pick from


def test_gpus_are_read_from_sglangs_own_parse_of_the_passthrough_flags():
    pytest.importorskip("sglang")
    from sglang.srt.server_args import prepare_server_args

    from aurora_sgl import reference_model_path
    from aurora_sgl.sglang_backend.gpus import trainer_device_for

    def device(*flags, count=8):
        return trainer_device_for(prepare_server_args(["--model-path", reference_model_path(), *flags]), count).device

    assert device() == "cuda:1"
    assert device("--tp", "2") == "cuda:2"  # argparse abbreviation, as SGLang accepts it
    assert device("--tensor-parallel-size", "2", "--dp-size", "2") == "cuda:4"
    assert device("--tp-size", "2", "--dp", "2", "--base-gpu-id", "1") == "cuda:0"
    assert device("--tp-size", "2", "--base-gpu-id", "0", count=2) == "cuda:1"  # all taken: shares the last
