#!/usr/bin/env bash
# GPU check for one CUDA machine without network or sglang (torch >= 2.11 + transformers):
# the embedded engine on the GPU (losslessness, tau, speedup), CUDA IPC ring and weight store
# across two processes (swap pauses), and the trainer on the GPU. Prints one table; < 8 minutes.
#   launch/device_check.sh                 # on the GPU
#   launch/device_check.sh --device cpu --quick   # the CPU smoke mode CI runs
#   launch/device_check.sh --sglang [--model-path M] [--only GROUPS] [SGLang flags]
#                                          # the SGLang backend (needs sglang): see launch/README.md
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [[ "${1:-}" == "--sglang" ]]; then
    shift
    # Eight server launches, each group of checks under its own time limit; 90 min if every group
    # ran to its limit (BUDGET_S in aurora_sgl/sglang_backend/device_check.py), an estimated 15-20
    # with the reference model. This deadline sits 5 min above that: the checks' own limits end
    # the run first, and the table still prints.
    exec timeout 5700 python -m aurora_sgl.sglang_backend.device_check \
        --json "${AURORA_CHECK_JSON:-/tmp/aurora_sglang_check.json}" "$@"
fi
exec timeout 470 python -m aurora_sgl.device_check --json "${AURORA_CHECK_JSON:-/tmp/aurora_device_check.json}" "$@"
