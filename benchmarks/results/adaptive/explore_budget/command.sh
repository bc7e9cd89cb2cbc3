#!/bin/bash
# A/B timing, interleaved: old = dbb43b8, new = ab07892 (worktrees of those commits), every arm adaptive
S=benchmarks/streams
C="--requests-per-phase 16 --max-tokens 48 --window 8 --no-plot"
run() { # tag wt args...
  tag=$1; wt=$2; shift 2; O=/work/wt/out/ab; mkdir -p $O
  (cd $wt && PYTHONPATH=$wt python benchmarks/traffic_shift.py $C "$@" --out $O/$tag.json > $O/$tag.log 2>&1)
}
for v in old new; do run checkb_c8_$v /work/wt/$v --concurrency 8 --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl; done
for v in new old; do run ref_c8_$v /work/wt/$v --concurrency 8 --shift sharp; done
for v in old new; do run checkb_c1_$v /work/wt/$v --concurrency 1 --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl; done
echo ALLDONE > /work/wt/out/ab/done
