"""Before/after table of the K = 0 records A/B (command.sh): per stream, version and rep, the online
arms' accept length per phase, the issue-14 figures, the static arm's accept length per phase (the
same code in both versions: the run-to-run noise) and the share of recorded positions the trainer
learned from. Tokens/s are left out: lockstep runs wait for the trainer."""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def phases(s: dict, arm: str) -> str:
    return " / ".join(f"{t:.3f}" for t in s["phase_tau"][arm])


rows = []
for stream in ("ref", "checkb", "checka"):
    for rep in ("", "_2"):
        for version in ("before", "after"):
            f = HERE / f"{stream}_{version}{rep}.json"
            if not f.exists():
                continue
            data = json.loads(f.read_text())
            s, arms = data["summary"], data["arms"]
            fresh = s.get("fresh_per_recorded_position") or {}
            k0 = [round(arms[a]["k_steps"][0] / max(1, sum(arms[a]["k_steps"])), 2) for a in ("day0", "online_static")]
            rows.append(
                f"| {stream} | {version} {rep.strip('_') or '1'} | {phases(s, 'day0')} | {phases(s, 'online_static')}"
                f" | {s['day0_over_offline']} | {s['online_over_static_after_shift']} | {phases(s, 'static')}"
                f" | {fresh.get('day0')} / {fresh.get('online_static')} | {k0[0]} / {k0[1]} |"
            )
print(
    "| stream | version, rep | day0 per phase | online_static per phase | day0 over offline | after shift "
    "| static per phase (same code: the noise) | fresh per recorded (day0 / online_static) "
    "| steps at K = 0 (day0 / online_static) |"
)
print("|---" * 9 + "|")
print("\n".join(rows))
