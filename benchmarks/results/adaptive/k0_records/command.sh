#!/bin/bash
# A/B of the ring's prefill flag (decode steps at K = 0 trained on like any generated position),
# every arm adaptive (the server's default), lockstep trainer R = 4, 48 requests per phase, 64 new
# tokens, window 16, concurrency 8, one quiet 2-core machine, interleaved per stream.
# Outputs were written to /work/wt/out/k0 and copied here (JSON only).
# before = e124be7 with the fresh_positions counter of f015358 cherry-picked (894425c, not in main's
# history), after = f430c26 (cecb04e + the counter; the JSONs record each commit).
S=/work/main/benchmarks/streams
C="--requests-per-phase 48 --max-tokens 64 --window 16 --concurrency 8 --trainer-budget 4 --no-plot --arms nospec,static,offline,day0,online_static"
run() { tag=$1; wt=$2; shift 2; (cd $wt && PYTHONPATH=$wt python benchmarks/traffic_shift.py $C "$@" --out /work/wt/out/k0/$tag.json > /work/wt/out/k0/$tag.log 2>&1); }
set -x
run ref_before /work/wt/before --shift sharp
run ref_after /work/wt/after --shift sharp
run checkb_after /work/wt/after --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl
run checkb_before /work/wt/before --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl
run checka_before /work/wt/before --shift sharp --stream $S/prose_heldout.jsonl,$S/math_heldout.jsonl,$S/code_heldout.jsonl
run checka_after /work/wt/after --shift sharp --stream $S/prose_heldout.jsonl,$S/math_heldout.jsonl,$S/code_heldout.jsonl
# rep 2 (ref and check_b, order reversed):
run ref_after_2 /work/wt/after --shift sharp
run ref_before_2 /work/wt/before --shift sharp
run checkb_before_2 /work/wt/before --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl
run checkb_after_2 /work/wt/after --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl
