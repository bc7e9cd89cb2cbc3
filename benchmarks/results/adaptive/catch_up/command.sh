#!/bin/bash
# A/B(/C) of the catch-up pricing, interleaved on one quiet 2-core machine, every arm adaptive, 16 requests
# per phase, 48 new tokens, concurrency 8. Worktrees: old = a85acec (the head's catch-up timed with the
# drafting step), new = 804d0a2 (catch-up kept out of the cost table, probes settled at their real cost),
# nosettle = 804d0a2 without the settle. Reps 1-5 (checkb) and 1-2 (ref) ran old/new alternately;
# reps 6-8 and 3-4 rotated the three versions' order.
S=benchmarks/streams
C="--requests-per-phase 16 --max-tokens 48 --window 8 --no-plot --arms nospec,static,offline --concurrency 8"
run() { tag=$1; wt=$2; shift 2; (cd $wt && PYTHONPATH=$wt python benchmarks/traffic_shift.py $C "$@" --out $tag.json); }
# e.g. run checkb_c8_old_1 /work/wt/old --shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl
#      run ref_c8_new_1 /work/wt/new --shift sharp
# summary: python benchmarks/results/adaptive/catch_up/summarize.py
