"""Prompt files: JSONL with `prompt`, chat `messages`, or the native fields of the datasets the
benchmarks stream (HumanEval `prompt`, MT-Bench `turns`, GSM8K `question`); or plain text, one
prompt per line. Chat-shaped rows go through the tokenizer's chat template. A row may also carry a
constraint on its output (`json_schema`, an object or its text, or `regex`), as SGLang's sampling
parameters spell them."""

from __future__ import annotations

import gzip
import json
from pathlib import Path


class PromptFileError(ValueError):
    pass


def row_to_prompt(row: dict, tokenizer) -> str:
    if isinstance(row.get("messages"), list):
        return tokenizer.apply_chat_template(row["messages"], tokenize=False, add_generation_prompt=True)
    if isinstance(row.get("turns"), list) and row["turns"]:  # MT-Bench: first turn
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": row["turns"][0]}], tokenize=False, add_generation_prompt=True
        )
    if isinstance(row.get("question"), str):  # GSM8K
        return f"Question: {row['question'].strip()}\nAnswer:"
    for key in ("prompt", "text"):
        if isinstance(row.get(key), str):
            return row[key]
    raise PromptFileError(f"row has none of the fields prompt / messages / turns / question / text: {sorted(row)[:6]}")


def row_constraints(row: dict) -> dict:
    """The row's output constraint as SamplingParams fields (json_schema as text), or {}."""
    out = {}
    schema = row.get("json_schema")
    if schema is not None:
        if not isinstance(schema, (dict, str)):
            raise PromptFileError("json_schema must be an object or its JSON text")
        out["json_schema"] = schema if isinstance(schema, str) else json.dumps(schema)
    if row.get("regex") is not None:
        if not isinstance(row["regex"], str):
            raise PromptFileError("regex must be a string")
        out["regex"] = row["regex"]
    if len(out) > 1:
        raise PromptFileError("a row constrains its output with json_schema or regex, not both")
    return out


def load_prompts(path: str | Path, tokenizer, limit: int | None = None) -> list[str]:
    return [r["prompt"] for r in load_prompt_rows(path, tokenizer, limit)]


def load_prompt_rows(path: str | Path, tokenizer, limit: int | None = None) -> list[dict]:
    """[{"prompt": text, and "json_schema" or "regex" where the row constrains its output}]."""
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"prompt file not found: {path}")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().splitlines()
    is_jsonl = ".jsonl" in path.name or ".json" in path.name
    prompts = []
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if is_jsonl:
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{path}:{no}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise PromptFileError(f"{path}:{no}: each line must be a JSON object")
            try:
                prompts.append({"prompt": row_to_prompt(row, tokenizer), **row_constraints(row)})
            except PromptFileError as e:
                raise PromptFileError(f"{path}:{no}: {e}") from None
        else:
            prompts.append({"prompt": line})
        if limit is not None and len(prompts) >= limit:
            break
    if not prompts:
        raise PromptFileError(f"no prompts in {path}")
    return prompts
