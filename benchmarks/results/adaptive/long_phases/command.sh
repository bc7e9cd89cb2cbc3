#!/bin/bash
# Every arm adaptive (the default), issue 14's phase length: 160 requests per phase, 64 new tokens, window 32,
# concurrency 8, free-running trainer; check_b (chat second turns -> held-out code -> chat). Run at 9b55479, ~12 min.
S=benchmarks/streams
python benchmarks/traffic_shift.py --requests-per-phase 160 --max-tokens 64 --window 32 --concurrency 8 --shift return \
    --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl --arms nospec,static,offline,day0,online_static \
    --out benchmarks/results/adaptive/long_phases/adaptive_checkb_c8.json
