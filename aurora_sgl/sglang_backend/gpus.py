"""Which GPU the trainer gets under `--backend sglang`: by default the first one SGLang leaves free.

A fixed default (`cuda:1`) lands on a GPU that TP or DP already fills; the trainer's weights,
optimizer state and batches then compete with SGLang's KV cache, sized before the trainer started.
"""

from __future__ import annotations

from typing import NamedTuple


class TrainerDevice(NamedTuple):
    device: str | None  # None: refused, `error` says why
    warning: str | None = None
    error: str | None = None


def server_gpus(tp: int, pp: int = 1, dp: int = 1, base: int = 0, step: int = 1, nnodes: int = 1) -> list[int]:
    """The GPU ids SGLang 0.5.23's schedulers occupy on this node (the first, where the trainer
    runs). Replica d, stage p, TP rank t: base + d*tp*pp*step + p*tp_node + t*step, as
    `DataParallelController.launch_dp_schedulers` / `launch_tensor_parallel_group` and, for one
    replica, `Engine` place them; with several nodes each holds the share `_calculate_rank_ranges`
    gives it. With the defaults (tp 1, dp 1, base 0): GPU 0 only."""
    pp_node = max(pp // nnodes, 1)
    tp_node = max(tp // max(nnodes // pp, 1), 1)
    return sorted(
        {
            base + d * tp * pp * step + p * tp_node + t * step
            for d in range(dp)
            for p in range(pp_node)
            for t in range(tp_node)
        }
    )


def pick_trainer_device(used: list[int], device_count: int, requested: str | None = None) -> TrainerDevice:
    """The user's device when it exists, else the first visible GPU not in `used`; when the server
    fills every GPU the trainer shares the server's last one, with a warning (it still trains, only
    slower and with less memory). Refuses a requested device that is not there: the trainer would
    die at start, over and over under its supervisor, far from the command line."""
    if requested is not None:
        import torch

        try:
            dev = torch.device(requested)
        except (RuntimeError, ValueError):
            return TrainerDevice(None, error=f"--trainer-device {requested} is not a device (say cuda:N)")
        if dev.type == "cuda" and (dev.index or 0) >= device_count:
            return TrainerDevice(
                None, error=f"--trainer-device {requested} does not exist: {device_count} GPU(s) visible here"
            )
        return TrainerDevice(requested)
    if device_count < 1:
        return TrainerDevice(None, error="the trainer needs a CUDA GPU and none is visible here")
    taken = set(used)
    free = [i for i in range(device_count) if i not in taken]
    if free:
        return TrainerDevice(f"cuda:{free[0]}")
    last = max(i for i in taken if i < device_count)
    return TrainerDevice(
        f"cuda:{last}",
        warning=f"the server uses every visible GPU; the trainer shares cuda:{last} with it "
        "(give it a GPU of its own with --trainer-device, or fewer to --tp-size/--dp-size)",
    )


def trainer_device_for(server_args, device_count: int, requested: str | None = None) -> TrainerDevice:
    """`pick_trainer_device` for the GPUs of SGLang's parsed ServerArgs (its own reading of
    --tp-size/--tp/--tensor-parallel-size, --dp-size, --pp-size, --base-gpu-id, --gpu-id-step,
    --nnodes, with its defaults)."""
    sa = server_args
    used = server_gpus(sa.tp_size, sa.pp_size, sa.dp_size, sa.base_gpu_id, sa.gpu_id_step, sa.nnodes)
    return pick_trainer_device(used, device_count, requested)
