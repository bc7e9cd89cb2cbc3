"""Training / held-out text for the reference target model, per domain.

Everything here is permissively licensed and local:
  code  - Python standard-library source of the running interpreter (PSF licence);
  math  - GSM8K *train* split (MIT); the test split is never read, benchmarks stream it;
  prose - Tiny Shakespeare (public domain; last 10% held out) and the standard library's docstrings.
HumanEval and MT-Bench are never read: the benchmarks stream them.

Splits are deterministic: held-out files are chosen by a hash of their path, held-out math rows are
the last rows of the train file, so a re-run sees the same split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SYSTEM, USER, ASSISTANT = "<|system|>", "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = [PAD, BOS, EOS, SYSTEM, USER, ASSISTANT]

# Byte budgets keep tokenisation and training inside the hour this CPU allows.
CODE_CHARS = 9_000_000
DOC_CHARS = 2_500_000
MATH_HELDOUT_ROWS = 400


class DatasetMissing(SystemExit):
    """Raised (as a clean exit) when an input the corpus needs is not on disk."""


@dataclass
class Domain:
    train: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)


def chat(user: str, assistant: str) -> str:
    """One chat exchange in the same layout as the tokenizer's chat template."""
    return f"{BOS}{USER}\n{user}\n{ASSISTANT}\n{assistant}{EOS}\n"


def _is_heldout(rel: str) -> bool:
    return int(hashlib.md5(rel.encode()).hexdigest(), 16) % 20 == 0


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise DatasetMissing(f"error: {what} not found at {path} (pass --data-dir pointing at shared/datasets)")
    return path


def stdlib_files() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = str(p.relative_to(root))
        if rel.startswith(("site-packages", "test/", "idlelib/idle_test", "lib2to3/tests")):
            continue
        out.append((rel, p))
    return out


def _docstrings(tree: ast.AST) -> list[tuple[str, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) >= 160:
                found.append((getattr(node, "name", "this module"), doc))
    return found


def code_and_docs(seed: int) -> tuple[Domain, Domain]:
    code, docs = Domain(), Domain()
    files = stdlib_files()
    random.Random(seed).shuffle(files)
    code_chars = doc_chars = 0
    for rel, path in files:
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        held = _is_heldout(rel)
        if held or code_chars < CODE_CHARS:
            (code.heldout if held else code.train).append(f"{BOS}# {rel}\n{text}{EOS}\n")
            code_chars += 0 if held else len(text)
        for name, doc in _docstrings(tree):
            if not held and doc_chars >= DOC_CHARS:
                break
            mod = rel[:-3].replace("/", ".")
            # Alternate plain prose and a chat form so /v1/chat/completions has something to say.
            if len(doc) % 2:
                sample = chat(f"What does {name} in {mod} do?", doc)
            else:
                sample = f"{BOS}{doc}{EOS}\n"
            (docs.heldout if held else docs.train).append(sample)
            doc_chars += 0 if held else len(doc)
    return code, docs


def math(data_dir: Path) -> Domain:
    path = _require(data_dir / "gsm8k" / "train.jsonl", "GSM8K train split")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    dom = Domain()
    for i, row in enumerate(rows):
        q, a = row["question"].strip(), row["answer"].strip()
        sample = chat(q, a) if i % 2 else f"{BOS}Question: {q}\nAnswer: {a}{EOS}\n"
        (dom.heldout if i >= len(rows) - MATH_HELDOUT_ROWS else dom.train).append(sample)
    return dom


def shakespeare(data_dir: Path) -> Domain:
    path = _require(data_dir / "shakespeare" / "input.txt", "Tiny Shakespeare")
    text = path.read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)
    cut = text.rfind("\n\n", 0, cut) + 2

    # Scenes are split at blank lines into passages of a few speeches each.
    def passages(part: str) -> list[str]:
        speeches = part.split("\n\n")
        return [f"{BOS}" + "\n\n".join(speeches[i : i + 6]) + f"{EOS}\n" for i in range(0, len(speeches), 6)]

    return Domain(train=passages(text[:cut]), heldout=passages(text[cut:]))


def load_corpus(data_dir: Path, seed: int) -> dict[str, Domain]:
    data_dir = _require(Path(data_dir), "dataset directory")
    code, docs = code_and_docs(seed)
    # "prose" in the sense is both literary (Shakespeare) and technical (docstrings);
    # they are kept apart so the model card can report each.
    return {"code": code, "math": math(data_dir), "shakespeare": shakespeare(data_dir), "docs": docs}
