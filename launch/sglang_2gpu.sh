#!/usr/bin/env bash
# SGLang backend on TWO GPUs: SGLang serves on cuda:0, the trainer has cuda:1 to itself.
# The ring and the weight store live on the serving GPU (the swap is a device-local copy); the
# trainer reads and publishes through CUDA IPC (peer access over NVLink / PCIe).
#   launch/sglang_2gpu.sh --model-path /models/Llama-3.1-8B-Instruct [more SGLang flags]
set -euo pipefail
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0,1}"
exec python -m aurora_sgl.launch_server --backend sglang --trainer-device cuda:1 \
    --base-gpu-id 0 --tp-size 1 --host 0.0.0.0 "$@"
