#!/bin/bash
# Timing A/B/C, interleaved (2026-12-08, one quiet 2-core machine): base = f2a6cb1, ev = 1cfd07b (first-draft
# outcomes from the catch-up), cu = 5b2b3ea (+ catch-up timed apart and priced per request; reverted in 00b1e34).
# Worktrees of those commits at /work/wt/{old,new,cu}; every arm adaptive (traffic_shift's default), c = 8.
# checkb rep 1 overlapped a test run on this machine: its figures are disturbed (day0 / online_static of cu).
S=benchmarks/streams
C="--requests-per-phase 16 --max-tokens 48 --window 8 --no-plot --concurrency 8"
CA="--shift sharp --stream $S/prose_heldout.jsonl,$S/math_heldout.jsonl,$S/code_heldout.jsonl"
CB="--shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl"
REF="--shift sharp"
declare -A WT=([base]=/work/wt/old [ev]=/work/wt/new [cu]=/work/wt/cu)
run() { # tag version args...
  tag=$1; v=$2; shift 2; O=$PWD/benchmarks/results/adaptive/catch_up_priced/runs; wt=${WT[$v]}
  (cd $wt && PYTHONPATH=$wt python benchmarks/traffic_shift.py $C "$@" --out $O/$tag.json)
}
orders=("base ev cu" "cu base ev" "ev cu base")
for rep in 1 2 3; do
  order=${orders[$((rep-1))]}
  for v in $order; do run checkb_${v}_$rep $v $CB; done
  for v in $order; do run ref_${v}_$rep $v $REF; done
  for v in $order; do run checka_${v}_$rep $v $CA; done
done
# The first batch (reps "a1".."a3", before the one above): base and ev only, in the same way, the order
# alternating per rep (rep 1 and 3: base first; rep 2: ev first). checkb_base_a1 started while another
# benchmark was finishing on this machine.
for rep in 1 2 3; do
  if [ $((rep % 2)) = 1 ]; then order="base ev"; else order="ev base"; fi
  for v in $order; do run checkb_${v}_a$rep $v $CB; done
  for v in $order; do run ref_${v}_a$rep $v $REF; done
  for v in $order; do run checka_${v}_a$rep $v $CA; done
done
python benchmarks/results/adaptive/catch_up_priced/summarize.py
