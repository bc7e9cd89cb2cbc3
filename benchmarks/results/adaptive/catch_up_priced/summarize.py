"""Tables of the catch-up round (command.sh): per stream and code version, each rep's tokens/s over
`nospec` of the same run per arm, with the share of request-steps that drafted (K > 0) per phase,
then the mean over reps.

    python benchmarks/results/adaptive/catch_up_priced/summarize.py
"""

import json
import statistics
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
VERSIONS = ("base", "ev", "cu")  # f2a6cb1; + first-draft outcomes (1cfd07b); + catch-up priced (5b2b3ea)
ROLE = {"ref": "tuning", "checka": "check", "checkb": "check"}


def drafting_share(arm: dict) -> str:
    per_phase = defaultdict(lambda: [0, 0])
    for r in arm["requests"]:
        ks = r.get("k_steps") or []
        per_phase[r["phase"]][0] += sum(ks[1:])
        per_phase[r["phase"]][1] += sum(ks)
    return "/".join(f"{d / max(1, n):.2f}" for d, n in (per_phase[p] for p in sorted(per_phase)))


def main() -> None:
    runs = defaultdict(list)
    for f in sorted(HERE.glob("runs/*.json")):
        stream, version, rep = f.stem.split("_")
        runs[(stream, version)].append((rep, json.loads(f.read_text())))
    for stream in ROLE:
        for version in VERSIONS:
            reps = runs.get((stream, version))
            if not reps:
                continue
            arms = [a for a in reps[0][1]["summary"]["speedup_over_nospec"] if a != "nospec"]
            for rep, d in reps:
                sp = d["summary"]["speedup_over_nospec"]
                cells = " ".join(f"{a} {sp[a]:.3f} [{drafting_share(d['arms'][a])}]" for a in arms)
                nospec = d["arms"]["nospec"]["tokens_per_s"]
                print(f"{stream} ({ROLE[stream]}) {version} rep {rep}: nospec {nospec:.1f} tok/s; {cells}")
            means = {a: statistics.fmean(d["summary"]["speedup_over_nospec"][a] for _, d in reps) for a in arms}
            print(f"  mean of {len(reps)}: " + ", ".join(f"{a} {v:.3f}" for a, v in means.items()))


if __name__ == "__main__":
    main()
