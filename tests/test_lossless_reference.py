"""Issue-level exactness check on the reference model: 50 prompts over code, math and prose,
random and trained head -- every greedy output token-for-token equal to transformers `generate` on
the same model. At batch 1 each prompt runs at one K (K = 1..6 in turn, every K on 8-9 prompts); at
8 concurrent every prompt runs at K = 1, 3 and 6, where rows of different lengths and acceptances
share a step. (The engine tests run every K on the tiny model; this is the reference model's check,
kept to the cases that differ, for the suite's time.)"""

import json

import pytest
import torch

from aurora_sgl import reference_head_path, reference_model_path
from aurora_sgl.engine.engine import Engine
from aurora_sgl.engine.sampling import SamplingParams

MAX_NEW = 24
BATCH_KS = (1, 3, 6)


def _prompts(tok, per_domain=17):
    rows = [json.loads(line) for line in open(f"{reference_model_path()}/heldout_sample.jsonl")]
    by_domain = {r["domain"]: r["text"] for r in rows}
    prompts = []
    for domain in ("code", "math", "shakespeare"):
        ids = tok(by_domain[domain], add_special_tokens=False)["input_ids"]
        for j in range(per_domain):
            start = j * 23
            prompts.append(ids[start : start + 12 + (j * 7) % 40])
    return prompts[:50]


@pytest.fixture(scope="module")
def setup(ref_tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(reference_model_path(), dtype=torch.float32).eval()
    prompts = _prompts(ref_tokenizer)
    refs = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(
                torch.tensor([p]), max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=ref_tokenizer.pad_token_id
            )
        seq = out[0, len(p) :].tolist()
        if ref_tokenizer.eos_token_id in seq:  # the EOS is the last output id (SGLang keeps it)
            seq = seq[: seq.index(ref_tokenizer.eos_token_id) + 1]
        refs.append(seq)
    return model, prompts, refs


@pytest.mark.parametrize("head", ["random", "trained"])
@pytest.mark.parametrize("concurrency", [1, 8])
def test_reference_greedy_lossless(setup, ref_tokenizer, head, concurrency):
    model, prompts, refs = setup
    assert len(prompts) == 50
    taus = {}
    ks = range(1, 7) if concurrency == 1 else BATCH_KS
    for k in ks:
        # batch 1: prompt i runs at K = 1 + i % 6 only; batched: every prompt at every K
        chosen = [i for i in range(len(prompts)) if concurrency > 1 or i % 6 == k - 1]
        eng = Engine(
            model=model,
            tokenizer=ref_tokenizer,
            num_speculative_steps=k,
            max_running_requests=concurrency,
            draft_model_path=reference_head_path() if head == "trained" else None,
            prefill_chunk_size=32,
        )
        outs = eng.generate([prompts[i] for i in chosen], SamplingParams(max_new_tokens=MAX_NEW))
        bad = [i for i, o in zip(chosen, outs) if o["output_ids"] != refs[i]]
        assert not bad, (k, bad[:5])
        taus[k] = sum(o["meta_info"]["spec_accept_length"] for o in outs) / len(outs)
    if head == "trained":
        assert max(taus.values()) > 1.5, taus
