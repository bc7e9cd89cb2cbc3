#!/bin/bash
# nospec and static (adaptive) at c = 8 on check_b alone, then with a 1-thread matmul loop on the
# other core, then alone again. Run from the root of a checkout (these figures: 0adebb8).
export PYTHONPATH=$PWD; S=benchmarks/streams; O=${OUT:-/tmp/cont}; mkdir -p $O
C="--requests-per-phase 16 --max-tokens 48 --window 8 --no-plot --concurrency 8 --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl --arms nospec,static"
python benchmarks/traffic_shift.py $C --out $O/alone1.json > $O/alone1.log 2>&1
python benchmarks/results/adaptive/contention/burn.py 60 & python benchmarks/traffic_shift.py $C --out $O/burn.json > $O/burn.log 2>&1; kill %1 2>/dev/null; wait
python benchmarks/traffic_shift.py $C --out $O/alone2.json > $O/alone2.log 2>&1
