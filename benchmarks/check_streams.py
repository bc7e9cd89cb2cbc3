"""Build the check streams' prompt files: text the reference model was never trained on and the
trainer's settings were never tuned on, so the traffic-shift figures on them say how online
training does on traffic nobody looked at.

    python benchmarks/check_streams.py            # writes benchmarks/streams/*.jsonl

Each file holds prompts of one domain, from a held-out part of a licensed source
(benchmarks/streams/README.md has the licences):
  prose_heldout  Tiny Shakespeare, the last 10% (held out of the reference model's training)
  math_heldout   GSM8K train, the last 400 rows (held out of the reference model's training)
  chat_turn2     MT-Bench second turns (the tuning stream uses first turns)
  code_heldout   functions of the standard-library files the reference model's corpus holds out
  math_json      held-out GSM8K train questions answered under a JSON schema (structured traffic)

The tuning stream is the default one of traffic_shift.py (HumanEval -> MT-Bench first turns ->
GSM8K test); defaults are picked on it only.
"""

from __future__ import annotations

import ast
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common.paths import datasets_dir  # noqa: E402
from benchmarks.reference.corpus import MATH_HELDOUT_ROWS, _is_heldout, stdlib_files  # noqa: E402

OUT = REPO / "benchmarks" / "streams"
PER_FILE = 160
SEED = 0


def prose_heldout(data: Path) -> list[dict]:
    text = (data / "shakespeare" / "input.txt").read_text(encoding="utf-8")
    cut = text.rfind("\n\n", 0, int(len(text) * 0.9)) + 2  # the reference corpus's own cut
    speeches = [s for s in text[cut:].split("\n\n") if s.strip()]
    return [{"prompt": "\n\n".join(speeches[i : i + 2]) + "\n\n"} for i in range(0, len(speeches) - 1, 2)]


def math_heldout(data: Path) -> list[dict]:
    rows = [json.loads(line) for line in (data / "gsm8k" / "train.jsonl").read_text().splitlines() if line.strip()]
    return [{"question": r["question"]} for r in rows[-MATH_HELDOUT_ROWS:]]


# The answer of a word problem as JSON: the quantities it mentions, then the result.
MATH_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "quantities": {"type": "array", "items": {"type": "number"}},
        "operation": {"enum": ["add", "subtract", "multiply", "divide", "mixed"]},
        "answer": {"type": "number"},
    },
    "required": ["quantities", "operation", "answer"],
    "additionalProperties": False,
}


def math_json(data: Path) -> list[dict]:
    return [
        {"prompt": f"Question: {r['question'].strip()}\nAnswer as JSON:\n", "json_schema": MATH_JSON_SCHEMA}
        for r in math_heldout(data)
    ]


def chat_turn2(data: Path) -> list[dict]:
    rows = [json.loads(line) for line in (data / "mt_bench" / "question.jsonl").read_text().splitlines() if line]
    return [{"messages": [{"role": "user", "content": r["turns"][1]}]} for r in rows if len(r["turns"]) > 1]


def code_heldout() -> list[dict]:
    """The signature, docstring and first lines of each function of the held-out stdlib files."""
    out = []
    for rel, path in stdlib_files():
        if not _is_heldout(rel):
            continue
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 6:
                body = lines[node.lineno - 1 : min(node.end_lineno, node.lineno + 7)]
                out.append({"prompt": "\n".join(body) + "\n"})
    return out


def main() -> int:
    data = datasets_dir()
    if not (data / "gsm8k").is_dir():
        print(f"error: datasets not found at {data} (set AURORA_DATASETS)", file=sys.stderr)
        return 2
    OUT.mkdir(exist_ok=True)
    rng = random.Random(SEED)
    for name, rows in (
        ("prose_heldout", prose_heldout(data)),
        ("math_heldout", math_heldout(data)),
        ("chat_turn2", chat_turn2(data)),
        ("code_heldout", code_heldout()),
        ("math_json", math_json(data)),
    ):
        if len(rows) > PER_FILE:
            rows = rng.sample(rows, PER_FILE)
        path = OUT / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"{path.relative_to(REPO)}: {len(rows)} prompts")
    return 0


if __name__ == "__main__":
    sys.exit(main())
