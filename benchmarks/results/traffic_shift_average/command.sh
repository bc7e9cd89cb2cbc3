#!/bin/bash
# The averaging / recency-replay round (2026-12-08), one quiet 2-core machine, runs in the order listed.
# Code: ae2e30d (replay_half_life) for the ref/ret hl* runs, 3e322bf (average_half_life, default 0 then)
# for the rest; each JSON records its commit. The worktrees were checkouts of those commits; here the
# paths are relative to the repository root. "hl0" and "avg0" are the default of the time (neither).
S=benchmarks/streams; O=benchmarks/results/traffic_shift_average/runs
B="--requests-per-phase 48 --max-tokens 48 --window 16 --concurrency 8 --trainer-budget 4 --fixed-k --no-plot"
F="--requests-per-phase 160 --max-tokens 64 --window 32 --fixed-k --k 4 --concurrency 8 --no-plot"
CA="--shift sharp --stream $S/prose_heldout.jsonl,$S/math_heldout.jsonl,$S/code_heldout.jsonl"
CB="--shift return --stream $S/chat_turn2.jsonl,$S/code_heldout.jsonl"
run() { tag=$1; cfg=$2; shift 2; python benchmarks/traffic_shift.py --trainer-config "$cfg" "$@" --out $O/$tag.json; }
set -x
# Tuning streams: replay recency (replay_half_life, in sequences) ...
for h in 0 16 8; do run ref_hl$h "{\"replay_half_life\": $h}" $B --shift sharp --arms online_static; done
for h in 0 16 8; do run ret_hl$h "{\"replay_half_life\": $h}" $B --shift return --arms online_static; done
# ... and the served average (average_half_life, in optimizer steps).
for h in 16 32 8; do
  run ref_avg$h "{\"average_half_life\": $h}" $B --shift sharp --arms online_static
  run ret_avg$h "{\"average_half_life\": $h}" $B --shift return --arms online_static
done
# 8 chosen on the tuning streams; the check streams, second reps, day 0.
A='{"average_half_life": 8}'; Z='{"average_half_life": 0}'
run checka_avg0 "$Z" $B $CA --arms online_static
run checka_avg8 "$A" $B $CA --arms online_static
run checkb_avg8 "$A" $B $CB --arms online_static
run checkb_avg0 "$Z" $B $CB --arms online_static
run ref_avg8_2 "$A" $B --shift sharp --arms online_static
run ref_hl0_2 "$Z" $B --shift sharp --arms online_static
run ret_hl0_2 "$Z" $B --shift return --arms online_static
run ret_avg8_2 "$A" $B --shift return --arms online_static
run checka_avg8_2 "$A" $B $CA --arms online_static
run checka_avg0_2 "$Z" $B $CA --arms online_static
run checkb_avg0_2 "$Z" $B $CB --arms online_static
run checkb_avg8_2 "$A" $B $CB --arms online_static
run d0ref_avg0 "$Z" $B --shift sharp --arms day0
run d0ref_avg8 "$A" $B --shift sharp --arms day0
run d0checka_avg8 "$A" $B $CA --arms day0
run d0checka_avg0 "$Z" $B $CA --arms day0
# (after the free-running runs below and the R sweep: a second day-0 rep on check_a)
run d0checka_avg8_2 "$A" $B $CA --arms day0
run d0checka_avg0_2 "$Z" $B $CA --arms day0
# Free-running (issue 14's settings), interleaved; the fixed arms once per stream.
run free_ref_avg0 "$Z" $F --shift sharp --arms static,offline,day0,online_static
run free_ref_avg8 "$A" $F --shift sharp --arms day0,online_static
run free_checkb_avg8 "$A" $F $CB --arms static,offline,day0,online_static
run free_checkb_avg0 "$Z" $F $CB --arms day0,online_static
# R = 16 and R = 1 with the average (the R sweep of the round).
run r16_checka_avg8 "$A" ${B/--trainer-budget 4/--trainer-budget 16} $CA --arms online_static
run r16_ref_avg8 "$A" ${B/--trainer-budget 4/--trainer-budget 16} --shift sharp --arms online_static
run r1_checkb_avg8 "$A" ${B/--trainer-budget 4/--trainer-budget 1} $CB --arms online_static
run r1_ret_avg8 "$A" ${B/--trainer-budget 4/--trainer-budget 1} --shift return --arms online_static
# Later the same day, at f2a6cb1 (lr) and 039ecbd / 326ff16 (cut_open_positions, adam_beta2; defaults otherwise).
for lr in 2e-3 4e-3; do
  run ref_lr${lr/-/} "{\"lr\": $lr}" $B --shift sharp --arms online_static
  run ret_lr${lr/-/} "{\"lr\": $lr}" $B --shift return --arms online_static
  run d0ref_lr${lr/-/} "{\"lr\": $lr}" $B --shift sharp --arms day0
done
run ref_lr2e3_2 '{"lr": 2e-3}' $B --shift sharp --arms online_static
for c in 16 8; do
  run ref_cut$c "{\"cut_open_positions\": $c}" $B --shift sharp --arms online_static
  run ret_cut$c "{\"cut_open_positions\": $c}" $B --shift return --arms online_static
  run d0ref_cut$c "{\"cut_open_positions\": $c}" $B --shift sharp --arms day0
done
C8='{"cut_open_positions": 8}'
run ret_cut8_2 "$C8" $B --shift return --arms online_static
run ref_cut8_2 "$C8" $B --shift sharp --arms online_static
run checka_cut8 "$C8" $B $CA --arms online_static
run checkb_cut8 "$C8" $B $CB --arms online_static
run ref_b0.99 '{"adam_beta2": 0.99}' $B --shift sharp --arms online_static
run ret_b0.99 '{"adam_beta2": 0.99}' $B --shift return --arms online_static
run d0ref_b0.99 '{"adam_beta2": 0.99}' $B --shift sharp --arms day0
# Cuts of 8 with 8 rows of context (a worktree of 205d833 with CUT_CONTEXT = 8, the value of 661dde9 on).
run ref_cut8c8 "$C8" $B --shift sharp --arms online_static
run ret_cut8c8 "$C8" $B --shift return --arms online_static
run checka_cut8c8 "$C8" $B $CA --arms online_static
run d0ref_cut8c8 "$C8" $B --shift sharp --arms day0
run checkb_cut8c8 "$C8" $B $CB --arms online_static
run ref_cut8c8_2 "$C8" $B --shift sharp --arms online_static
# (at c88c576, CUT_CONTEXT = 8 in the code)
run d0ref_cut8c8_2 "$C8" $B --shift sharp --arms day0
run ret_cut8c8_2 "$C8" $B --shift return --arms online_static
python benchmarks/results/traffic_shift_average/summarize.py
