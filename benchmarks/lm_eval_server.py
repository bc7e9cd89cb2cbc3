"""lm-evaluation-harness (`lm_eval`, its `local-completions` model) against the server, K = 4 and K = 0.

    python -m venv --system-site-packages /tmp/lmeval_venv && /tmp/lmeval_venv/bin/pip install "lm_eval[api]"
    /tmp/lmeval_venv/bin/python benchmarks/lm_eval_server.py --out benchmarks/results/lm_eval/lm_eval.json
    /tmp/lmeval_venv/bin/python benchmarks/lm_eval_server.py --url http://127.0.0.1:30000 --out F.json
    /tmp/lmeval_venv/bin/python benchmarks/lm_eval_server.py --write-tasks-only

Two small tasks, written into `benchmarks/lm_eval_tasks/` from the shipped GSM8K test split (MIT;
`datasets_dir()`), read by lm_eval as local JSON (nothing is downloaded):
  aurora_gsm8k_gen  generate_until: "Question: ...\\nAnswer:", greedy, 64 new tokens, exact match
                    on the number after "####" (strict) and on the last number (flexible);
  aurora_gsm8k_mc   multiple_choice (loglikelihood): the question and its worked solution, then
                    "####"; the choices are the gold number and three other numbers of the same
                    problem; acc and acc_norm.
The script starts the server itself (the reference model, `--no-online`; K = 4 with the offline head
and adaptive K off, then K = 0), one at a time, and runs both tasks against each with stock
`local-completions` through /v1/completions (token-id prompts, BOS added as the server adds it to
text). lm_eval reads a continuation's logprobs as the echoed prompt's minus the last entry (the one
generated token), which is right when the server keeps a generated EOS in the output with its
logprob, as SGLang does (here the model's next token is EOS after almost every `#### <number>`).
Each multiple-choice loglikelihood is checked against transformers' own forward over the same
tokens (lm_eval's encoding), and speculation must not change the scores: K = 4's loglikelihoods are
compared with K = 0's (max |difference|) and the greedy generations must be identical. `--url`
evaluates a running server instead.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common.paths import REPO, datasets_dir  # noqa: E402

TASK_DIR = REPO / "benchmarks" / "lm_eval_tasks"
TASKS = ["aurora_gsm8k_gen", "aurora_gsm8k_mc"]
SEED = 16
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

GEN_YAML = """\
# Written by benchmarks/lm_eval_server.py from GSM8K test (MIT, (c) 2021 OpenAI); do not edit by hand.
task: aurora_gsm8k_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: benchmarks/lm_eval_tasks/gsm8k_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: target
generation_kwargs:
  until:
    - "Question:"
  do_sample: false
  temperature: 0.0
  max_gen_toks: {max_gen_toks}
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
  - name: flexible
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    regexes_to_ignore:
      - ","
      - "\\\\$"
      - "\\\\.$"
metadata:
  version: 1.0
"""

MC_YAML = """\
# Written by benchmarks/lm_eval_server.py from GSM8K test (MIT, (c) 2021 OpenAI); do not edit by hand.
task: aurora_gsm8k_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: benchmarks/lm_eval_tasks/gsm8k_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: label
target_delimiter: " "
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _num(s: str) -> str:
    s = s.replace(",", "").rstrip(".")
    return s[:-2] if s.endswith(".0") else s


def write_tasks(n_gen: int, n_mc: int, max_gen_toks: int) -> dict:
    """The two tasks' JSONL files and YAMLs under TASK_DIR, from disjoint seeded samples of GSM8K test."""
    rows = [json.loads(line) for line in (datasets_dir() / "gsm8k" / "test.jsonl").open()]
    idx = random.Random(SEED).sample(range(len(rows)), n_gen + n_mc)
    rng = random.Random(SEED + 1)
    gen, mc = [], []
    for i in idx[:n_gen]:
        r = rows[i]
        gen.append(
            {
                "row": i,
                "prompt": f"Question: {r['question']}\nAnswer:",
                "target": _num(r["answer"].split("####")[-1].strip()),
            }
        )
    for i in idx[n_gen:]:
        r = rows[i]
        solution, gold = r["answer"].rsplit("\n####", 1)
        gold = _num(gold.strip())
        others = []
        for m in NUMBER.findall(r["question"] + "\n" + solution):
            m = _num(m)
            if m != gold and m not in others and float(m) != float(gold):
                others.append(m)
        rng.shuffle(others)
        distractors = others[:3]
        k = 1
        while len(distractors) < 3:  # too few numbers in the problem: gold +- k
            for d in (str(int(float(gold)) + k), str(int(float(gold)) - k)):
                if len(distractors) < 3 and d != gold and d not in distractors:
                    distractors.append(d)
            k += 1
        choices = [gold, *distractors]
        rng.shuffle(choices)
        mc.append(
            {
                "row": i,
                "context": f"Question: {r['question']}\nAnswer: {solution}\n####",
                "choices": choices,
                "label": choices.index(gold),
            }
        )
    TASK_DIR.mkdir(parents=True, exist_ok=True)
    for name, docs in (("gsm8k_gen", gen), ("gsm8k_mc", mc)):
        with open(TASK_DIR / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(d) + "\n" for d in docs)
    (TASK_DIR / "gsm8k_gen.yaml").write_text(GEN_YAML.format(max_gen_toks=max_gen_toks))
    (TASK_DIR / "gsm8k_mc.yaml").write_text(MC_YAML)
    return {"source": "gsm8k/test.jsonl", "seed": SEED, "gen_rows": idx[:n_gen], "mc_rows": idx[n_gen:]}


def evaluate(url: str, model: str, tasks: list[str], num_concurrent: int, limit: int | None) -> dict:
    """`tasks` against one server with lm_eval's `model`; its scores and the per-sample responses."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from aurora_sgl import reference_model_path

    model_args = {
        "base_url": url + "/v1/completions",
        "model": "reference_model",
        "tokenizer": reference_model_path(),
        "tokenizer_backend": "huggingface",
        "tokenized_requests": True,  # token ids: the loglikelihood positions are lm_eval's own
        "add_bos_token": True,  # as the server tokenizes a text prompt
        "num_concurrent": num_concurrent,
        "max_retries": 1,  # a refused request fails the run rather than being retried
        "max_length": 2048,
        "timeout": 600,
    }
    t0 = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=tasks,
        task_manager=TaskManager(include_path=str(TASK_DIR)),
        log_samples=True,
        limit=limit,
        random_seed=SEED,
        numpy_random_seed=SEED,
        torch_random_seed=SEED,
        fewshot_random_seed=SEED,
    )
    wall = time.perf_counter() - t0
    samples, requests = {}, {}
    for task in tasks:
        per_doc, args = {}, {}
        for s in out["samples"][task]:
            if task.endswith("_mc"):  # one (loglikelihood, is_greedy) per choice
                per_doc[s["doc_id"]] = [[float(r[0][0]), bool(r[0][1])] for r in s["resps"]]
                args[s["doc_id"]] = [list(a) for a in s["arguments"]]
            else:
                per_doc[s["doc_id"]] = s["resps"][0][0]
        samples[task] = [per_doc[d] for d in sorted(per_doc)]
        if args:
            requests[task] = [args[d] for d in sorted(args)]
    res = out["results"]
    scores = {t: {k: v for k, v in res[t].items() if isinstance(v, float) and "_stderr" not in k} for t in tasks}
    stderr = {t: {k: v for k, v in res[t].items() if "_stderr" in k} for t in tasks}
    args = {k: v for k, v in model_args.items() if k != "tokenizer"}
    return {
        "model": model,
        "wall_s": round(wall, 1),
        "scores": scores,
        "stderr": stderr,
        "model_args": args,
        "samples": samples,
        "requests": requests,
    }


def compare_ll(a: list, b: list) -> dict:
    """Two runs' multiple-choice loglikelihoods, [doc][choice] = [loglikelihood, is_greedy]."""
    flat_a, flat_b = [c for d in a for c in d], [c for d in b for c in d]
    diffs = [abs(x[0] - y[0]) for x, y in zip(flat_a, flat_b, strict=True)]
    picks = [
        (max(range(len(da)), key=lambda j: da[j][0]), max(range(len(db)), key=lambda j: db[j][0]))
        for da, db in zip(a, b, strict=True)
    ]
    return {
        "loglikelihoods": len(diffs),
        "max_abs_diff": max(diffs),
        "mean_abs_diff": sum(diffs) / len(diffs),
        "exactly_equal": sum(d == 0.0 for d in diffs),
        "is_greedy_differ": sum(x[1] != y[1] for x, y in zip(flat_a, flat_b, strict=True)),
        "argmax_differ": sum(p != q for p, q in picks),
    }


def compare_gen(a: list, b: list) -> dict:
    pairs = list(zip(a, b, strict=True))
    return {
        "docs": len(pairs),
        "identical": sum(x == y for x, y in pairs),
        "differ_doc_ids": [i for i, (x, y) in enumerate(pairs) if x != y],
    }


def server_stats(url: str) -> dict | None:
    """What the server says about speculation: K and its last accept-length window."""
    import httpx

    try:
        st = httpx.get(url + "/aurora/stats", timeout=10).json()
    except Exception:  # noqa: BLE001 - informational only
        return None
    hist = st.get("accept_length", {}).get("history") or [None]
    return {"speculative_num_steps": st.get("speculative_num_steps"), "accept_length_last_window": hist[-1]}


def run_server(url: str, args) -> dict:
    """Both tasks with stock `local-completions`."""
    stock = evaluate(url, "local-completions", TASKS, args.num_concurrent, args.limit)
    return {"local_completions": stock, "server_stats": server_stats(url)}


def reference_loglikelihoods(model_args: dict, requests: list[list], threads: int = 1) -> list[list]:
    """transformers' (loglikelihood, is_greedy) per [doc][choice] for the multiple-choice requests
    (context, continuation), tokenized by lm_eval itself (`_encode_pair`, BOS as configured), and
    whether the model's greedy token after the whole sequence is EOS (the token lm_eval's request
    generates and drops)."""
    import torch
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from transformers import AutoModelForCausalLM

    from aurora_sgl import reference_model_path

    torch.set_num_threads(threads)  # more threads than free cores: 20x slower on a shared machine
    lm = LocalCompletionsAPI(**{**model_args, "tokenizer": reference_model_path()})
    model = AutoModelForCausalLM.from_pretrained(reference_model_path(), dtype=torch.float32).eval()
    eos = lm.tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for doc in requests:
            rows = []
            for context, continuation in doc:
                ctx, cont = lm._encode_pair(context, continuation)
                ids = torch.tensor([ctx + cont])
                lp = torch.log_softmax(model(ids).logits[0].float(), -1)
                rows_lp = lp[len(ctx) - 1 : -1]
                target = torch.tensor(cont)
                ll = float(rows_lp.gather(1, target.unsqueeze(1)).sum())
                greedy = bool((rows_lp.argmax(-1) == target).all())
                rows.append([ll, greedy, int(lp[-1].argmax()) == eos])
            out.append(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "lm_eval" / "lm_eval.json"))
    ap.add_argument("--url", help="evaluate this running server only")
    ap.add_argument("--n-gen", type=int, default=40)
    ap.add_argument("--n-mc", type=int, default=50)
    ap.add_argument("--max-gen-toks", type=int, default=64)
    ap.add_argument("--num-concurrent", type=int, default=4)
    ap.add_argument("--limit", type=int, help="lm_eval's limit: first N docs of each task")
    ap.add_argument("--threads", type=int, default=1, help="torch threads: the started servers' and the reference's")
    ap.add_argument("--write-tasks-only", action="store_true")
    args = ap.parse_args()

    task_info = write_tasks(args.n_gen, args.n_mc, args.max_gen_toks)
    if args.write_tasks_only:
        return
    os.chdir(REPO)  # the tasks' data_files are relative to the checkout
    from aurora_sgl import reference_head_path
    from benchmarks.common.server import ServerProcess

    common = ["--no-online", "--max-running-requests", "8"]
    arms = {
        "k4": ["--speculative-num-steps", "4", "--no-speculative-adaptive"]
        + ["--speculative-draft-model-path", reference_head_path(), *common],
        "k0": ["--speculative-num-steps", "0", *common],
    }
    t_start = time.perf_counter()
    runs = {}
    if args.url:
        runs["url"] = {"url": args.url, **run_server(args.url.rstrip("/"), args)}
    else:
        for name, server_args in arms.items():
            t0 = time.perf_counter()
            server = ServerProcess(*server_args, threads=args.threads)
            try:
                runs[name] = {"server_args": [a.replace(str(REPO) + "/", "") for a in server_args]}
                runs[name].update(run_server(server.url, args))
            finally:
                server.stop()
            runs[name]["wall_s"] = round(time.perf_counter() - t0, 1)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    import lm_eval

    result = {
        "commit": commit.stdout.strip() or None,
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "lm_eval_version": lm_eval.__version__,
        "config": {
            "tasks": TASKS,
            "task_dir": str(TASK_DIR.relative_to(REPO)),
            "n_gen": args.n_gen,
            "n_mc": args.n_mc,
            "max_gen_toks": args.max_gen_toks,
            "num_concurrent": args.num_concurrent,
            "limit": args.limit,
            "server_threads": args.threads,
            **task_info,
        },
        "wall_s": round(time.perf_counter() - t_start, 1),
        "runs": runs,
    }
    mc = TASKS[1]
    first = next(iter(runs.values()))["local_completions"]
    t0 = time.perf_counter()
    ref = reference_loglikelihoods(first["model_args"], first["requests"][mc], args.threads)
    result["transformers_reference"] = {
        "what": "loglikelihood and is_greedy of each choice by transformers (float32) over lm_eval's tokens",
        "wall_s": round(time.perf_counter() - t0, 1),
        "generated_token_is_eos": sum(c[2] for d in ref for c in d),
        "samples": [[c[:2] for c in d] for d in ref],
    }
    for run in runs.values():
        run["vs_transformers"] = compare_ll(
            run["local_completions"]["samples"][mc], result["transformers_reference"]["samples"]
        )
    if "k4" in runs and "k0" in runs:
        k4, k0 = runs["k4"], runs["k0"]
        result["k4_vs_k0"] = {
            "gen": compare_gen(
                k4["local_completions"]["samples"][TASKS[0]], k0["local_completions"]["samples"][TASKS[0]]
            ),
            "mc_local_completions": compare_ll(
                k4["local_completions"]["samples"][mc], k0["local_completions"]["samples"][mc]
            ),
            "scores_equal": k4["local_completions"]["scores"] == k0["local_completions"]["scores"],
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")

    print(f"\n{'server':<6} {'task':<17} {'metric':<22} {'value':>7}")
    for name, run in runs.items():
        for task, metrics in run["local_completions"]["scores"].items():
            for metric, v in metrics.items():
                print(f"{name:<6} {task:<17} {metric:<22} {v:>7.3f}")
        c = run["vs_transformers"]
        print(
            f"{name:<6} loglikelihoods vs transformers: max |diff| {c['max_abs_diff']:.3g} over {c['loglikelihoods']}, "
            f"is_greedy differs on {c['is_greedy_differ']}, pick differs on {c['argmax_differ']}; "
            f"wall {run.get('wall_s', '-')} s"
        )
    print(f"requests whose generated token is EOS: {result['transformers_reference']['generated_token_is_eos']}")
    if "k4_vs_k0" in result:
        c = result["k4_vs_k0"]
        m = c["mc_local_completions"]
        print(
            f"K=4 vs K=0 loglikelihoods: max |diff| {m['max_abs_diff']:.3g} over {m['loglikelihoods']} "
            f"({m['exactly_equal']} exactly equal), pick differs on {m['argmax_differ']}; generations identical "
            f"{c['gen']['identical']}/{c['gen']['docs']}; scores equal: {c['scores_equal']}"
        )
    print(f"wall {result['wall_s']} s; wrote {args.out}")


if __name__ == "__main__":
    main()
