"""The trainer-niceness A/B (command.sh): tokens/s over `nospec` of the same run per arm, each rep,
then the mean over reps per stream and niceness.

    python benchmarks/results/adaptive/trainer_nice/summarize.py
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    runs = defaultdict(list)
    for f in sorted(HERE.glob("runs/*.json")):
        stream, nice, rep = f.stem.split("_")
        runs[(stream, nice)].append((rep, json.loads(f.read_text())["summary"]["speedup_over_nospec"]))
    for (stream, nice), reps in sorted(runs.items()):
        arms = [a for a in reps[0][1] if a != "nospec"]
        for rep, sp in reps:
            print(f"{stream} {nice} rep {rep}: " + ", ".join(f"{a} {sp[a]:.3f}" for a in arms))
        print("  mean: " + ", ".join(f"{a} {statistics.fmean(sp[a] for _, sp in reps):.3f}" for a in arms))


if __name__ == "__main__":
    main()
