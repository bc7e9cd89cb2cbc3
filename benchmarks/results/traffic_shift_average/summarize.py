"""Tables of the averaging / recency-replay round (command.sh): per stream and trainer setting, each
rep's online arm per phase and the issue-14 figures against the fixed arms of the stream's base run
(the static and offline heads at a fixed K: the same figures in every run), then the mean over reps.

    python benchmarks/results/traffic_shift_average/summarize.py
"""

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent
sys.path.insert(0, str(RESULTS.parent))
import budget_summary  # noqa: E402
import traffic_shift as ts  # noqa: E402

# The fixed arms of each stream under a budget: the earlier deterministic runs (fixed K, greedy).
BASE = {
    "ref": RESULTS / "traffic_shift_guardrail/runs/base_ref_r4.json",
    "ret": RESULTS / "traffic_shift_recall/runs/base_ret_r4.json",
    "checka": RESULTS / "traffic_shift_guardrail/runs/base_checka_r4.json",
    "checkb": RESULTS / "traffic_shift_guardrail/runs/base_checkb_r4.json",
}
ROLE = {"ref": "tuning", "ret": "tuning", "checka": "check", "checkb": "check"}


def figures(run: dict, fixed: dict, arm: str) -> dict:
    """budget_summary's figures for one online arm, and for a return stream the two windows its
    retention divides (better learning in phase 1 lowers the ratio: the windows say why)."""
    fig = budget_summary.figures(run, fixed)
    out = {"phases": fig["phase_tau"][arm]}
    if arm == "online_static":
        out["after shift"] = fig["online_over_static_after_shift"]
        if "return_retention" in fig:
            per, w, n = run["config"]["requests_per_phase"], run["config"]["window"], len(run["stream"])
            t = ts.head_taus(run["arms"][arm]["requests"])
            out["retention"] = fig["return_retention"]
            out["phase 1 last window"] = ts.known_mean(t[per - w : per])
            out["return first window"] = ts.known_mean(t[n - per : n - per + w])
    else:
        out["day0 over offline"] = fig["day0_over_offline"]
    return out


def table(pattern: str, stream_of, base_of) -> None:
    groups: dict = {}
    for f in sorted(HERE.glob(f"runs/{pattern}")):
        run = json.loads(f.read_text())
        stream, label = stream_of(f.stem)
        fixed = base_of(stream, run)
        for arm in run["arms"]:
            if arm in ("day0", "online_static"):
                groups.setdefault((stream, arm, label), []).append((f.stem, figures(run, fixed, arm)))
    keys = ["after shift", "retention", "phase 1 last window", "return first window", "day0 over offline"]
    for (stream, arm, label), reps in sorted(groups.items()):
        for stem, fig in reps:
            extra = ", ".join(f"{k} {fig[k]:.3f}" for k in keys if k in fig)
            print(
                f"{stream} ({ROLE[stream]}) {arm} {label} [{stem}]: phases "
                + " / ".join(f"{p:.3f}" for p in fig["phases"])
                + f"; {extra}"
            )
        if len(reps) > 1:
            means = {k: statistics.fmean(fig[k] for _, fig in reps) for k in keys if k in reps[0][1]}
            print(f"  mean of {len(reps)}: " + ", ".join(f"{k} {v:.3f}" for k, v in means.items()))


def budget_stream(stem: str):
    budget = "R = 4"
    if stem.startswith(("r1_", "r16_")):
        r, stem = stem.split("_", 1)
        budget = f"R = {r[1:]}"
    stream, label = stem.split("_", 1)
    stream = stream.removeprefix("d0")
    label = label.removesuffix("_2").replace("hl0", "avg0")  # hl0 = neither change: the default before
    return stream, f"{label}, {budget}"


print("## Under a trainer budget (R = 1, 4, 16; 48 requests per phase, 48 tokens, window 16, c = 8, K = 4 fixed)")
table("[rcd]*.json", budget_stream, lambda stream, run: json.loads(BASE[stream].read_text()))

print("\n## Free-running (160 requests per phase, 64 tokens, window 32, c = 8, K = 4 fixed)")
free_fixed = {}
for f in sorted(HERE.glob("runs/free_*.json")):
    run = json.loads(f.read_text())
    if "static" in run["arms"]:
        free_fixed[f.stem.split("_")[1]] = run
table("free_*.json", lambda stem: (stem.split("_")[1], stem.split("_")[2]), lambda stream, run: free_fixed[stream])
