#!/usr/bin/env bash
# CPU demo: reference model, embedded engine, 4 draft tokens per step, one core left for the trainer.
set -euo pipefail
exec python -m aurora_sgl.launch_server --backend embedded --speculative-num-steps 4 \
    --threads "$(( $(nproc) > 1 ? $(nproc) - 1 : 1 ))" "$@"
