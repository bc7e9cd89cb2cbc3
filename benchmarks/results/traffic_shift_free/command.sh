#!/bin/bash
# Free-running trainer (no --trainer-budget), fixed K = 4, issue 14's settings: 160 requests per phase,
# 64 new tokens, window 32, concurrency 8. Run at 804d0a2 on a quiet 2-core machine (~12 min per stream).
S=benchmarks/streams; O=benchmarks/results/traffic_shift_free
C="--requests-per-phase 160 --max-tokens 64 --window 32 --fixed-k --k 4 --concurrency 8 --arms static,offline,day0,online_static"
python benchmarks/traffic_shift.py $C --shift sharp --out $O/free_ref.json
python benchmarks/traffic_shift.py $C --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl --out $O/free_checkb.json
