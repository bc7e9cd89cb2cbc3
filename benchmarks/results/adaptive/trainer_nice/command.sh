#!/bin/bash
# Timing A/B at 326ff16 (2026-12-08, one quiet 2-core machine): the online arms' trainer at nice 0 (the default)
# and 19; every arm adaptive, c = 8. The static and offline arms have no trainer: they show the noise.
# Run from the root of a checkout.
export PYTHONPATH=$PWD; S=benchmarks/streams; O=benchmarks/results/adaptive/trainer_nice/runs
C="--requests-per-phase 16 --max-tokens 48 --window 8 --no-plot --concurrency 8"
CA="--shift sharp --stream $S/prose_heldout.jsonl,$S/math_heldout.jsonl,$S/code_heldout.jsonl"
CB="--shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl"
REF="--shift sharp"
run() { tag=$1; nice=$2; shift 2; python benchmarks/traffic_shift.py $C "$@" --trainer-config "{\"nice\": $nice}" --out $O/$tag.json; }
for rep in 1 2; do
  if [ $rep = 1 ]; then order="0 19"; else order="19 0"; fi
  for n in $order; do run checkb_nice${n}_$rep $n $CB; done
  for n in $order; do run ref_nice${n}_$rep $n $REF; done
  for n in $order; do run checka_nice${n}_$rep $n $CA; done
done
python benchmarks/results/adaptive/trainer_nice/summarize.py
