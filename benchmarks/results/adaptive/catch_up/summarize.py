"""Tokens/s of each adaptive arm over `nospec` of the same run, per version and stream (mean of reps)."""

import json
import statistics
from pathlib import Path

here = Path(__file__).parent
ratios: dict[tuple[str, str, str], list[float]] = {}
for f in sorted(here.glob("*.json")):
    stream, _, version, _ = f.stem.split("_")
    arms = json.loads(f.read_text())["arms"]
    for arm in ("static", "offline"):
        ratios.setdefault((stream, arm, version), []).append(arms[arm]["tokens_per_s"] / arms["nospec"]["tokens_per_s"])
for (stream, arm, version), r in sorted(ratios.items()):
    print(f"{stream:7s}{arm:8s}{version:9s} mean {statistics.mean(r):.3f}  reps {' '.join(f'{x:.3f}' for x in r)}")
