#!/usr/bin/env bash
# GPU check for one CUDA machine without network or sglang (torch >= 2.11 + transformers):
# the embedded engine on the GPU (losslessness, tau, speedup), CUDA IPC ring and weight store
# across two processes (swap pauses), and the trainer on the GPU. Prints one table; < 8 minutes.
#   launch/device_check.sh                 # on the GPU
#   launch/device_check.sh --device cpu --quick   # the CPU smoke mode CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 470 python -m aurora_sgl.device_check --json "${AURORA_CHECK_JSON:-/tmp/aurora_device_check.json}" "$@"
