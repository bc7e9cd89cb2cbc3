#!/usr/bin/env bash
# SGLang backend on ONE GPU: serving and the trainer share cuda:0.
# Leave the trainer room: SGLang's KV cache takes --mem-fraction-static of the card (0.80 here,
# lower it if the trainer runs out of memory; the trainer holds the target's embedding and
# lm_head, the head, AdamW state and a batch).
#   launch/sglang_1gpu.sh --model-path /models/Llama-3.1-8B-Instruct \
#       [--speculative-draft-model-path /models/EAGLE3-LLaMA3.1-Instruct-8B] [more SGLang flags]
# Both paths are local directories: the trainer and the plugin read them too.
set -euo pipefail
exec python -m aurora_sgl.launch_server --backend sglang --trainer-device cuda:0 \
    --mem-fraction-static 0.80 --host 0.0.0.0 "$@"
