"""Before/after table of the K = 0 records A/B (command.sh): per stream and version, the online arms'
accept length per phase, the issue-14 figures, tokens/s over nospec and the trainer's fresh share."""

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
rows = []
for stream in ("ref", "checkb", "checka"):
    for version in ("before", "after"):
        f = HERE / f"{stream}_{version}.json"
        if not f.exists():
            continue
        s = json.loads(f.read_text())["summary"]
        arms = json.loads(f.read_text())["arms"]
        fresh = s.get("fresh_per_recorded_position") or {}
        k0 = {a: round(arms[a]["k_steps"][0] / max(1, sum(arms[a]["k_steps"])), 3) for a in ("day0", "online_static")}
        rows.append(
            f"| {stream} | {version} | "
            + " | ".join(" / ".join(f"{t:.3f}" for t in s["phase_tau"][a]) for a in ("day0", "online_static"))
            + f" | {s['day0_over_offline']} | {s['online_over_static_after_shift']}"
            + " | "
            + " / ".join(f"{t:.3f}" for t in s["phase_tau"]["static"])
            + f" | {fresh.get('day0')} / {fresh.get('online_static')}"
            + f" | {k0['day0']} / {k0['online_static']} |"
        )
print(
    "| stream | version | day0 per phase | online_static per phase | day0 over offline | after shift "
    "| static per phase (unchanged code: the noise) | fresh per recorded (day0 / online_static) "
    "| share of steps at K = 0 |"
)
print("|---" * 9 + "|")
print("\n".join(rows))
sys.exit(0)
