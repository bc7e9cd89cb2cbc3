"""Logprobs: exactly the target's, whatever K and draft head; through the embedded engine, the
native /generate, the OpenAI routes (openai client) and SGLang's frontend `select`."""

import itertools
import math

import pytest
import torch

from aurora_sgl.engine.engine import Engine
from aurora_sgl.engine.sampling import SamplingParams
from helpers import MAX_NEW, PROMPTS  # noqa: E402

TOL = 1e-4
LP = dict(return_logprob=True, top_logprobs_num=5, logprob_start_len=0, token_ids_logprob=(3, 17))


def _engine(model, tok, k, **kw):
    kw.setdefault("prefill_chunk_size", 5)
    return Engine(model=model, tokenizer=tok, num_speculative_steps=k, **kw)


def _changing_k(ks=(0, 3, 1, 4, 0, 0, 2, 4, 4, 1, 0, 2)):
    it = itertools.cycle(ks)
    return lambda reqs: next(it)


def _params(temperature, top_k=-1):
    return [
        SamplingParams(max_new_tokens=MAX_NEW, temperature=temperature, top_k=top_k, seed=i, ignore_eos=True, **LP)
        for i in range(len(PROMPTS[:6]))
    ]


# At T > 0 two engines draw different samples (speculative sampling is exact in distribution, not
# per draw), so the K comparison samples at T = 0.7 with top_k = 1: the sampling path runs, every
# engine commits the same tokens, and the logprobs (after temperature, before top-k) are nontrivial.
# The T = 0.7 values of freely sampled sequences are checked against transformers below.
def _k_params(temperature):
    return _params(temperature, top_k=1 if temperature else -1)


def _close(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
        elif isinstance(x, (list, tuple)):
            _close(x, y)
        else:
            assert abs(x - y) <= TOL, (x, y)


@pytest.fixture(scope="module")
def k0_outputs(tiny_model, ref_tokenizer):
    """K = 0 reference per temperature."""
    out = {}
    for t in (0.0, 0.7):
        eng = _engine(tiny_model, ref_tokenizer, 0, max_running_requests=4)
        out[t] = eng.generate(PROMPTS[:6], _k_params(t))
    return out


@pytest.mark.parametrize("temperature", [0.0, 0.7])
@pytest.mark.parametrize("setup", ["random K=4", "trained K=4", "trained K changing", "trained adaptive"])
def test_logprobs_equal_k0_for_any_k_and_head(tiny_model, ref_tokenizer, tiny_head_dir, k0_outputs, setup, temperature):
    head = None if setup.startswith("random") else tiny_head_dir
    eng = _engine(
        tiny_model, ref_tokenizer, 4, max_running_requests=4, draft_model_path=head, adaptive="adaptive" in setup
    )
    if "changing" in setup:
        eng.k_policy = _changing_k()
    outs = eng.generate(PROMPTS[:6], _k_params(temperature))
    for out, ref in zip(outs, k0_outputs[temperature]):
        assert out["output_ids"] == ref["output_ids"]
        lp, rp = out["logprobs"], ref["logprobs"]
        assert lp.keys() == rp.keys()
        assert lp["output_token_logprobs"][1] == out["output_ids"]
        assert len(lp["output_token_logprobs"][0]) == len(out["output_ids"])
        for key in lp:
            if key.endswith("_token_logprobs"):
                _close(lp[key][0], rp[key][0])
                assert lp[key][1] == rp[key][1]
            elif key.endswith("top_logprobs"):
                for a, b in zip(lp[key], rp[key], strict=True):
                    if a is None or b is None:
                        assert a is None and b is None
                        continue
                    _close(a[0], b[0])
                    # ids agree except where two alternatives tie within tolerance
                    assert sum(x != y for x, y in zip(a[1], b[1])) <= 2
            else:
                _close(lp[key], rp[key])
    if "trained" in setup and temperature == 0.0:
        assert max(o["meta_info"]["spec_accept_length"] for o in outs) > 1.3  # accept paths ran


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_transformers(tiny_model, ref_tokenizer, tiny_head_dir, temperature):
    """An independent reference: transformers' own logits over prompt + output."""
    eng = _engine(tiny_model, ref_tokenizer, 4, max_running_requests=4, draft_model_path=tiny_head_dir)
    outs = eng.generate(PROMPTS[:4], _params(temperature)[:4])
    for prompt, out in zip(PROMPTS, outs):
        prompt_ids = ref_tokenizer(prompt)["input_ids"]
        ids = prompt_ids + out["output_ids"]
        with torch.no_grad():
            logits = tiny_model(torch.tensor([ids])).logits[0].float()
        n = len(prompt_ids)
        out_lp = torch.log_softmax(logits[n - 1 : len(ids) - 1] / (temperature or 1.0), -1)
        want = out_lp.gather(1, torch.tensor(out["output_ids"]).unsqueeze(1))[:, 0].tolist()
        lp = out["logprobs"]
        _close(lp["output_token_logprobs"][0], want)
        # input logprobs: raw log_softmax (no temperature), first token None
        in_lp = torch.log_softmax(logits[: n - 1], -1)
        want_in = [None] + in_lp.gather(1, torch.tensor(prompt_ids[1:]).unsqueeze(1))[:, 0].tolist()
        _close(lp["input_token_logprobs"][0], want_in)
        assert lp["input_token_logprobs"][1] == prompt_ids
        # top alternatives: sorted, the argmax first, and the chosen token in them when greedy
        for j, (vals, top_ids) in enumerate(lp["output_top_logprobs"]):
            assert vals == sorted(vals, reverse=True) and len(vals) == 5
            assert abs(vals[0] - float(out_lp[j].max())) <= TOL
            if temperature == 0.0:
                assert out["output_ids"][j] == top_ids[0]
            _close([lp["output_token_ids_logprobs"][j][0]], [float(out_lp[j, 3])])
        assert lp["input_top_logprobs"][0] is None and lp["input_token_ids_logprobs"][0] is None
        for j, (vals, _ids) in enumerate(lp["input_top_logprobs"][1:]):
            _close(vals, in_lp[j].topk(5).values.tolist())


def test_logprob_start_len_and_chunking(tiny_model, ref_tokenizer):
    """Input logprobs from logprob_start_len on, across prefill chunks; -1 gives none; the
    prompt length gives none; past it is refused."""
    prompt = PROMPTS[7]
    ids = ref_tokenizer(prompt)["input_ids"]
    n = len(ids)
    full = _engine(tiny_model, ref_tokenizer, 0, prefill_chunk_size=64).generate(
        prompt, SamplingParams(max_new_tokens=0, return_logprob=True, logprob_start_len=0)
    )[0]["logprobs"]["input_token_logprobs"]
    assert len(full[0]) == n and full[0][0] is None
    for start in (1, 4, 5, n - 1, n):
        eng = _engine(tiny_model, ref_tokenizer, 2, prefill_chunk_size=3)
        lp = eng.generate(prompt, SamplingParams(max_new_tokens=3, return_logprob=True, logprob_start_len=start))[0][
            "logprobs"
        ]
        vals, toks = lp["input_token_logprobs"]
        assert toks == ids[start:] and len(vals) == n - start
        if start < n:
            assert vals[0] is None
            _close(vals[1:], full[0][start + 1 :])
        assert len(lp["output_token_logprobs"][0]) == 3
    none = _engine(tiny_model, ref_tokenizer, 0).generate(prompt, SamplingParams(max_new_tokens=2, return_logprob=True))
    assert none[0]["logprobs"]["input_token_logprobs"] == ([], [])
    with pytest.raises(ValueError, match="logprob_start_len"):
        _engine(tiny_model, ref_tokenizer, 0).add_request(
            prompt, SamplingParams(return_logprob=True, logprob_start_len=n + 1)
        )


def test_requests_without_logprobs_compute_none(tiny_model, ref_tokenizer):
    eng = _engine(tiny_model, ref_tokenizer, 2)
    calls = []
    lm_head = eng.target.hf.lm_head
    orig = lm_head.forward
    lm_head.forward = lambda x: calls.append(tuple(x.shape)) or orig(x)
    try:
        out = eng.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4))
    finally:
        del lm_head.forward
    assert "logprobs" not in out[0]
    # only the target's own forwards ([B, T, H]): no extra lm_head over prompt rows ([N, H])
    assert calls and all(len(s) == 3 for s in calls), calls


def test_stop_string_truncation_keeps_lengths(tiny_model, ref_tokenizer):
    eng = _engine(tiny_model, ref_tokenizer, 4)
    free = eng.generate(PROMPTS[0], SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True))[0]
    text = free["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    if not stop.strip():
        pytest.skip("no usable stop string in this continuation")
    out = eng.generate(
        PROMPTS[0],
        SamplingParams(max_new_tokens=MAX_NEW, ignore_eos=True, stop=(stop,), return_logprob=True, top_logprobs_num=2),
    )[0]
    lp = out["logprobs"]
    assert out["meta_info"]["finish_reason"] == "stop"
    assert len(lp["output_token_logprobs"][0]) == len(out["output_ids"]) == len(lp["output_top_logprobs"])
    assert all(math.isfinite(x) for x in lp["output_token_logprobs"][0])
