"""Summarise traffic_shift.py runs under a trainer budget: per stream, the fixed arms (static,
offline) of one run and the online arms of others (same stream, seeds and budget, so the fixed arms
are identical by construction), into one table, one JSON and one PNG per stream.

    python benchmarks/budget_summary.py --out benchmarks/results/traffic_shift_budget \\
        ref=runs/base_ref_r4.json ref:defaults=runs/c3_ref_r4.json ...

Each argument is STREAM[:LABEL]=FILE: the first file of a stream must hold the static and offline
arms; LABEL names the trainer settings of its online arms (default: the file's stem).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import traffic_shift as ts  # noqa: E402

_mean = ts.known_mean  # a request that never drafted has no head figure


def figures(run: dict, fixed: dict) -> dict:
    """The issue's figures for the online arms of `run`, against the fixed arms of `fixed`."""
    n, per, w = len(run["stream"]), run["config"]["requests_per_phase"], run["config"]["window"]
    taus = {a: ts.head_taus(res["requests"]) for a, res in {**fixed["arms"], **run["arms"]}.items()}
    out = {"trainer_budget": run["config"].get("trainer_budget"), "trainer_config": run["config"]["trainer_config"]}
    if "online_static" in run["arms"] and "static" in taus:
        out["online_over_static_after_shift"] = round(
            _mean(taus["online_static"][per:]) / _mean(taus["static"][per:]), 3
        )
    if "offline" in taus and "static" in taus:
        # What a head as good as the offline one on every domain would score: a ceiling for the
        # online arm on streams where a post-shift phase is the static head's own domain.
        out["offline_over_static_after_shift"] = round(_mean(taus["offline"][per:]) / _mean(taus["static"][per:]), 3)
    if "day0" in run["arms"] and "offline" in taus:
        out["day0_over_offline"] = round(_mean(taus["day0"][n - w :]) / _mean(taus["offline"][n - w :]), 3)
    if run["config"]["shift"] == "return" and "online_static" in run["arms"]:
        t = taus["online_static"]
        out["return_retention"] = round(_mean(t[n - per : n - per + w]) / _mean(t[per - w : per]), 3)
    summary = run.get("summary", {})
    for key in ("recovery_requests", "settle_requests"):
        if key in summary:
            out[key] = {a: v for a, v in summary[key].items() if a in run["arms"]}
    out["positions_per_recorded_position"] = summary.get("positions_per_recorded_position")
    out["phase_tau"] = {a: [round(_mean(taus[a][i * per : (i + 1) * per]), 3) for i in range(n // per)] for a in taus}
    out["commit"] = run.get("commit")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for summary.json and one PNG per stream")
    ap.add_argument("runs", nargs="+", help="STREAM[:LABEL]=FILE")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    fixed: dict[str, dict] = {}
    result: dict[str, dict] = {}
    for spec in args.runs:
        key, _, path = spec.partition("=")
        stream, _, label = key.partition(":")
        run = json.loads(Path(path).read_text())
        fixed.setdefault(stream, run)
        label = label or Path(path).stem
        result.setdefault(stream, {})[label] = figures(run, fixed[stream])
        arms = {**fixed[stream]["arms"], **{f"{a} ({label})": r for a, r in run["arms"].items()}}
        png = args.out / f"{stream}_{label}.png"
        ts.plot(
            arms,
            run["stream"],
            run["config"]["window"],
            png,
            f"{stream}: {label}, budget {run['config'].get('trainer_budget')}",
        )
    (args.out / "summary.json").write_text(json.dumps(result, indent=1) + "\n")
    for stream, labels in result.items():
        print(f"== {stream}")
        for label, f in labels.items():
            keys = ("online_over_static_after_shift", "day0_over_offline", "return_retention")
            print(f"  {label:>24}: " + "  ".join(f"{k}={f.get(k)}" for k in keys if k in f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
