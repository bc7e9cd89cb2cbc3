#!/bin/bash
# nospec on check_b at c = 8: alone / beside a 1-thread matmul loop on the other core / beside the loop at
# nice 19, interleaved x3 (2026-12-08, code 1cfd07b: nospec has no head, so the adaptive code does not matter).
# Run from the root of a checkout.
export PYTHONPATH=$PWD; S=benchmarks/streams; O=benchmarks/results/adaptive/contention/nice
C="--requests-per-phase 16 --max-tokens 48 --window 8 --no-plot --concurrency 8 --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl --arms nospec"
B=benchmarks/results/adaptive/contention/burn.py
for rep in 1 2 3; do
  python benchmarks/traffic_shift.py $C --out $O/alone_$rep.json
  python $B 40 & bp=$!; python benchmarks/traffic_shift.py $C --out $O/burn_$rep.json; kill $bp; wait
  nice -n 19 python $B 40 & bp=$!; python benchmarks/traffic_shift.py $C --out $O/nice_$rep.json; kill $bp; wait
done
