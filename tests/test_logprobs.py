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
    # Adaptive: the real chooser, probing every other step, so K changes whatever this machine's
    # step costs say (with the default budget a loaded machine may choose K = 0 throughout).
    adaptive = {"adaptive": True, "explore_every": 2, "explore_share": 100.0} if "adaptive" in setup else {}
    eng = _engine(tiny_model, ref_tokenizer, 4, max_running_requests=4, draft_model_path=head, **adaptive)
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


# ---- the real server (reference model, K = 4) against an in-process K = 0 engine ----------------
NAME = "reference_model"
SERVER_PROMPTS = ["def add(a, b):\n", "KING HENRY:\n", "The json module"]


@pytest.fixture(scope="module")
def server():
    from aurora_sgl import reference_head_path
    from benchmarks.common.server import ServerProcess

    s = ServerProcess(
        "--speculative-num-steps",
        "4",
        "--speculative-draft-model-path",
        reference_head_path(),
        "--max-running-requests",
        "8",
        "--no-speculative-adaptive",  # every step at K = 4 (the engine tests above mix K)
        "--no-online",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def k0():
    """K = 0 engine on the server's model: the reference values."""
    eng = Engine(num_speculative_steps=0, max_running_requests=4)

    def run(prompt, **params):
        params.setdefault("temperature", 0.0)
        out = eng.generate(prompt, SamplingParams(return_logprob=True, **params))[0]
        return out["output_ids"], out["logprobs"]

    run.engine = eng
    return run


def test_native_generate_logprobs(server, k0):
    import httpx

    prompt = SERVER_PROMPTS[0]
    body = {
        "text": prompt,
        "sampling_params": {"max_new_tokens": 16, "temperature": 0},
        "return_logprob": True,
        "top_logprobs_num": 3,
        "logprob_start_len": 0,
        "token_ids_logprob": [5, 9],
        "return_text_in_logprobs": True,
    }
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    ids, ref = k0(prompt, max_new_tokens=16, top_logprobs_num=3, logprob_start_len=0, token_ids_logprob=(5, 9))
    assert r.json()["output_ids"] == ids
    assert meta["spec_k_steps"][4] == meta["spec_verify_ct"] > 0
    out = meta["output_token_logprobs"]
    assert [t[1] for t in out] == ids and meta["output_token_logprobs_length"] == len(ids)
    _close([t[0] for t in out], ref["output_token_logprobs"][0])
    tok = k0.engine.tokenizer
    assert [t[2] for t in out] == [tok.decode([i]) for i in ids]
    inp = meta["input_token_logprobs"]
    assert [t[1] for t in inp] == ref["input_token_logprobs"][1] and inp[0][0] is None
    _close([t[0] for t in inp], ref["input_token_logprobs"][0])
    assert meta["input_top_logprobs"][0] is None and len(meta["input_top_logprobs"]) == len(inp)
    for got, (vals, top_ids) in zip(meta["output_top_logprobs"], ref["output_top_logprobs"], strict=True):
        _close([g[0] for g in got], vals)
        assert [g[1] for g in got][:1] == top_ids[:1]
    for got, want in zip(meta["output_token_ids_logprobs"], ref["output_token_ids_logprobs"], strict=True):
        assert [g[1] for g in got] == [5, 9]
        _close([g[0] for g in got], want)
    assert meta["input_token_ids_logprobs"][0] is None

    # streaming: cumulative, like SGLang's default; the last event carries everything
    import json

    with httpx.stream("POST", server.url + "/generate", json=dict(body, stream=True), timeout=60) as s:
        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    lens = [len(e["meta_info"]["output_token_logprobs"]) for e in events]
    assert lens == sorted(lens) and lens[-1] == len(ids)
    assert all(len(e["meta_info"]["output_token_logprobs"]) == len(e["output_ids"]) for e in events)
    _close([t[0] for t in events[-1]["meta_info"]["output_token_logprobs"]], ref["output_token_logprobs"][0])

    # a batch with return_logprob per prompt
    r = httpx.post(
        server.url + "/generate",
        json={
            "text": SERVER_PROMPTS[:2],
            "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "return_logprob": [True, False],
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert len(r.json()[0]["meta_info"]["output_token_logprobs"]) == 4
    assert "output_token_logprobs" not in r.json()[1]["meta_info"]
    bad = httpx.post(server.url + "/generate", json={"text": prompt, "return_logprob": [True, True]}, timeout=60)
    assert bad.status_code == 400 and "return_logprob" in bad.json()["error"]["message"]
    bad = httpx.post(
        server.url + "/generate", json={"text": prompt, "return_logprob": True, "logprob_start_len": 10_000}
    )
    assert bad.status_code == 400 and "logprob_start_len" in bad.json()["error"]["message"]
    bad = httpx.post(server.url + "/generate", json={"text": prompt, "return_logprob": True, "top_logprobs_num": 21})
    assert bad.status_code == 400 and "top_logprobs_num" in bad.json()["error"]["message"]


def test_openai_chat_logprobs(server, k0):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "Name a color."}]
    r = client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3
    )
    tok = k0.engine.tokenizer
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids, ref = k0(k0.engine.encode(prompt), max_new_tokens=12, top_logprobs_num=3)
    content = r.choices[0].logprobs.content
    assert [c.token for c in content] == [tok.decode([i]) for i in ids]
    _close([c.logprob for c in content], ref["output_token_logprobs"][0])
    for c, (vals, _) in zip(content, ref["output_top_logprobs"], strict=True):
        assert len(c.top_logprobs) == 3 and c.top_logprobs[0].token == c.token  # greedy: chosen is top
        _close([t.logprob for t in c.top_logprobs], vals)
        assert c.bytes == list(c.token.encode())
    stream = client.chat.completions.create(
        model=NAME, messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, stream=True
    )
    streamed = [c for ch in stream for c in ((ch.choices[0].logprobs.content or []) if ch.choices[0].logprobs else [])]
    assert [c.token for c in streamed] == [c.token for c in content]
    _close([c.logprob for c in streamed], ref["output_token_logprobs"][0])
    # without top_logprobs: empty alternatives; above OpenAI's 20: refused by name
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, temperature=0, logprobs=True)
    assert all(c.top_logprobs == [] for c in r.choices[0].logprobs.content)
    import openai

    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="top_logprobs requires logprobs"):
        client.chat.completions.create(model=NAME, messages=msgs, max_tokens=3, top_logprobs=2)


def test_openai_completions_echo_logprobs(server, k0):
    """What lm-evaluation-harness sends for loglikelihood: echo, logprobs, max_tokens 0."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    prompt = SERVER_PROMPTS[1] + " I think"
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    lp = r.choices[0].logprobs
    _, ref = k0(prompt, max_new_tokens=0, top_logprobs_num=1, logprob_start_len=0)
    vals, ids = ref["input_token_logprobs"]
    assert r.choices[0].text == prompt
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    _close(lp.token_logprobs, vals)
    tok = k0.engine.tokenizer
    assert lp.tokens == [tok.decode([i]) for i in ids]
    assert all(len(t) == 1 for t in lp.top_logprobs[1:])
    assert lp.text_offset == sorted(lp.text_offset)
    # token ids as the prompt, echo and generate: prompt entries then output entries
    ids_prompt = k0.engine.encode(prompt)
    r = client.completions.create(model=NAME, prompt=ids_prompt, max_tokens=5, echo=True, logprobs=2, temperature=0)
    out_ids, ref = k0(ids_prompt, max_new_tokens=5, top_logprobs_num=2, logprob_start_len=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids_prompt) + len(out_ids)
    _close(lp.token_logprobs, ref["input_token_logprobs"][0] + ref["output_token_logprobs"][0])
    chunks = list(
        client.completions.create(
            model=NAME, prompt=ids_prompt, max_tokens=5, echo=True, logprobs=2, temperature=0, stream=True
        )
    )
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    _close(streamed, ref["input_token_logprobs"][0] + ref["output_token_logprobs"][0])
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    chunks = list(
        client.completions.create(model=NAME, prompt=prompt, max_tokens=0, echo=True, logprobs=1, stream=True)
    )
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    _close(streamed, vals)  # max_tokens 0 streamed: the prompt's logprobs with the last chunk
    # no echo: the output's only; streaming adds up to the same
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=8, logprobs=0, temperature=0)
    out_ids, ref = k0(prompt, max_new_tokens=8)
    _close(r.choices[0].logprobs.token_logprobs, ref["output_token_logprobs"][0])
    chunks = list(
        client.completions.create(model=NAME, prompt=prompt, max_tokens=8, logprobs=0, temperature=0, stream=True)
    )
    streamed = [v for c in chunks if c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]
    _close(streamed, ref["output_token_logprobs"][0])
    import openai

    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model=NAME, prompt=prompt, max_tokens=1, logprobs=21)
    with pytest.raises(openai.BadRequestError, match="suffix"):
        client.completions.create(model=NAME, prompt=prompt, max_tokens=1, suffix="x")


# Contexts after which the reference model's greedy next token is EOS: a finished GSM8K answer, and
# a question whose greedy answer ends with EOS after some 70 tokens (so the K = 4 server drafts there).
EOS_NEXT = "Question: Sam has 5 pens and buys 3 more. How many pens does he have?\nAnswer: 5 + 3 = 8\n#### 8"
ENDS_ON_EOS = (
    "Question: There are 90 rooms at the KozyInn Motel. It takes housekeeping 20 minutes to clean each room. "
    "How many hours would it take to clean one-half of the rooms?\nAnswer:"
)


def _streamed_logprobs(chunks) -> list:
    return [v for c in chunks if c.choices and c.choices[0].logprobs for v in c.choices[0].logprobs.token_logprobs]


def test_a_loglikelihood_request_whose_generated_token_is_eos(server, k0):
    """lm-evaluation-harness's local-completions loglikelihood request -- token ids (BOS added),
    echo, max_tokens 1, logprobs 1 -- reads token_logprobs[ctxlen:-1], the last entry being the
    generated token. When that token is EOS it must be there (SGLang keeps the EOS in output_ids
    with its logprob and counts it in completion_tokens); the text shows neither it nor the BOS."""
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    eng = k0.engine
    eos = eng.tokenizer.eos_token_id
    ids = eng.encode(EOS_NEXT)
    assert ids[0] == eng.tokenizer.bos_token_id
    out_ids, ref = k0(ids, max_new_tokens=1, top_logprobs_num=1, logprob_start_len=0)
    assert out_ids == [eos]  # the greedy next token
    req = dict(model=NAME, prompt=ids, max_tokens=1, echo=True, logprobs=1, temperature=0)
    r = client.completions.create(**req)
    c = r.choices[0]
    lp = c.logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == len(ids) + 1
    assert math.isfinite(lp.token_logprobs[-1]) and lp.token_logprobs[-1] < 0
    _close(lp.token_logprobs, ref["input_token_logprobs"][0] + ref["output_token_logprobs"][0])
    assert lp.tokens[-1] == eng.tokenizer.eos_token and list(lp.top_logprobs[-1].values()) == [lp.token_logprobs[-1]]
    assert c.text == EOS_NEXT and c.finish_reason == "stop"  # echo as SGLang: special tokens skipped
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), 1)
    chunks = list(client.completions.create(**req, stream=True, stream_options={"include_usage": True}))
    _close(_streamed_logprobs(chunks), lp.token_logprobs)
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert chunks[-1].usage.completion_tokens == 1
    # native: output_ids, completion_tokens, finish_reason {"type": "stop", "matched": eos}, text ""
    import httpx

    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}, "return_logprob": True}
    got = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    meta = got["meta_info"]
    assert got["output_ids"] == [eos] and got["text"] == "" and meta["completion_tokens"] == 1
    assert meta["finish_reason"] == {"type": "stop", "matched": eos}
    _close([t[0] for t in meta["output_token_logprobs"]], ref["output_token_logprobs"][0])


def test_a_long_generation_ending_on_eos_equals_k0(server, k0):
    """At K = 4 the EOS arrives in a verify step: the same ids (EOS last), logprobs, text and usage as
    the K = 0 engine, blocking and streamed."""
    import httpx
    from openai import OpenAI

    eng = k0.engine
    eos = eng.tokenizer.eos_token_id
    out_ids, ref = k0(ENDS_ON_EOS, max_new_tokens=128)
    assert out_ids[-1] == eos and eos not in out_ids[:-1] and len(out_ids) > 20
    text = eng.tokenizer.decode(out_ids[:-1])
    body = {"text": ENDS_ON_EOS, "sampling_params": {"max_new_tokens": 128, "temperature": 0}, "return_logprob": True}
    got = httpx.post(server.url + "/generate", json=body, timeout=120).json()
    meta = got["meta_info"]
    assert got["output_ids"] == out_ids and got["text"] == text and meta["completion_tokens"] == len(out_ids)
    assert meta["spec_verify_ct"] > 0 and meta["finish_reason"] == {"type": "stop", "matched": eos}
    _close([t[0] for t in meta["output_token_logprobs"]], ref["output_token_logprobs"][0])
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    req = dict(model=NAME, prompt=ENDS_ON_EOS, max_tokens=128, temperature=0, logprobs=0)
    r = client.completions.create(**req)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(out_ids)
    _close(r.choices[0].logprobs.token_logprobs, ref["output_token_logprobs"][0])
    chunks = list(client.completions.create(**req, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == len(out_ids)
    _close(_streamed_logprobs(chunks), ref["output_token_logprobs"][0])
    with httpx.stream("POST", server.url + "/generate", json=dict(body, stream=True), timeout=120) as s:
        import json

        events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    assert events[-1]["output_ids"] == out_ids and events[-1]["text"] == text
    assert all(eng.tokenizer.eos_token not in e["text"] for e in events)


def test_a_matched_stop_token_id_is_kept_in_the_ids_not_in_the_text(server, k0):
    """stop_token_ids: the matched id ends output_ids (SGLang's finish_reason matched: id) and its
    text is trimmed, native and OpenAI, blocking and streamed; K = 4 equals K = 0."""
    import httpx
    from openai import OpenAI

    eng = k0.engine
    prompt = SERVER_PROMPTS[0]
    free, _ = k0(prompt, max_new_tokens=16)
    stop = free[4]
    assert stop not in eng.eos_ids
    out_ids, ref = k0(prompt, max_new_tokens=16, stop_token_ids=(stop,))
    assert out_ids == free[: free.index(stop) + 1] and len(ref["output_token_logprobs"][0]) == len(out_ids)
    text = eng.tokenizer.decode(out_ids[:-1])
    assert text != eng.tokenizer.decode(out_ids)
    body = {"text": prompt, "sampling_params": {"max_new_tokens": 16, "temperature": 0, "stop_token_ids": [stop]}}
    got = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert got["output_ids"] == out_ids and got["text"] == text
    assert got["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert got["meta_info"]["completion_tokens"] == len(out_ids)
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    req = dict(model=NAME, prompt=prompt, max_tokens=16, temperature=0, extra_body={"stop_token_ids": [stop]})
    r = client.completions.create(**req)
    assert r.choices[0].text == text and r.usage.completion_tokens == len(out_ids)
    chunks = list(client.completions.create(**req, stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == text
    assert chunks[-1].usage.completion_tokens == len(out_ids)


def test_sglang_select(server, k0):
    """SGLang's frontend `select` scores each choice with return_logprob / logprob_start_len on
    /generate; it picks what the target's own logprobs pick."""
    import sglang as sgl

    @sgl.function
    def pick(s, prompt, choices):
        s += prompt
        s += sgl.select("answer", choices=choices)

    choices = [" red", " blue", " green apples and more"]
    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    state = pick.run(prompt="The sky is", choices=choices)
    # the same choice by the token-length-normalized prompt logprob (select's default), computed
    # in-process at K = 0
    scores = []
    for c in choices:
        _, ref = k0("The sky is" + c, max_new_tokens=0, logprob_start_len=0)
        n = len(k0.engine.encode("The sky is"))
        vals = [v for v in ref["input_token_logprobs"][0][max(n - 2, 0) :] if v is not None]
        scores.append(sum(vals) / len(vals))
    assert state["answer"] == choices[scores.index(max(scores))]
    meta = state.get_meta_info("answer")
    assert meta is not None and len(meta["normalized_prompt_logprobs"]) == len(choices)


def test_sampling_controls_through_the_api_equal_k0(server, k0):
    """Penalties, min tokens and logit bias as the OpenAI client and SGLang's native API send them:
    the K = 4 server's text equals the K = 0 engine's with the same controls, and differs from
    the text without them."""
    import httpx
    from openai import OpenAI

    eng = k0.engine
    prompt = SERVER_PROMPTS[1]
    bias_tok = eng.encode(" the")[-1]

    def reference(**controls):
        return eng.generate(prompt, SamplingParams(max_new_tokens=24, **controls))[0]["text"]

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    openai_controls = dict(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={str(bias_tok): 4.0})
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=24, temperature=0, **openai_controls)
    want = reference(frequency_penalty=1.5, presence_penalty=0.5, logit_bias={bias_tok: 4.0})
    assert r.choices[0].text == want != reference()
    r = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=24,
        temperature=0,
        extra_body={"repetition_penalty": 1.8, "min_tokens": 24},  # SGLang's extensions
    )
    assert r.choices[0].text == reference(repetition_penalty=1.8, min_new_tokens=24) != reference()
    native = {"max_new_tokens": 24, "temperature": 0, "repetition_penalty": 1.8, "logit_bias": {str(bias_tok): 4.0}}
    got = httpx.post(server.url + "/generate", json={"text": prompt, "sampling_params": native}, timeout=60).json()
    assert got["text"] == reference(repetition_penalty=1.8, logit_bias={bias_tok: 4.0}) != reference()


def test_structured_output_through_the_api_equals_k0(server, k0):
    """A json_schema response through the openai client parses into its schema and equals the
    K = 0 engine's; a native regex generation matches its regex; SGLang's frontend gen(regex=)."""
    import json
    import re

    import httpx
    import sglang as sgl
    from openai import OpenAI

    eng = k0.engine
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}, "rank": {"type": "integer"}},
        "required": ["city", "rank"],
        "additionalProperties": False,
    }
    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    fmt = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    msgs = [{"role": "user", "content": "Name a city and its rank as JSON."}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=48, temperature=0, response_format=fmt)
    prompt = eng.encode(eng.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    want = eng.generate(prompt, SamplingParams(max_new_tokens=48, json_schema=json.dumps(schema)))[0]
    text = r.choices[0].message.content
    assert text == want["text"] and r.choices[0].finish_reason == "stop", text
    value = json.loads(text)
    assert set(value) == {"city", "rank"} and isinstance(value["rank"], int) and len(value["city"]) <= 12, value
    regex = r"(yes|no), because [a-z ]{3,20}\."
    body = {"text": SERVER_PROMPTS[1], "sampling_params": {"max_new_tokens": 40, "temperature": 0, "regex": regex}}
    got = httpx.post(server.url + "/generate", json=body, timeout=60).json()
    assert got["text"] == eng.generate(SERVER_PROMPTS[1], SamplingParams(max_new_tokens=40, regex=regex))[0]["text"]
    assert re.fullmatch(regex, got["text"]) and got["meta_info"]["finish_reason"]["type"] == "stop", got

    @sgl.function
    def answer(s):
        s += "Q: Is the sky blue? A: "
        s += sgl.gen("yn", max_tokens=8, regex=r"(yes|no)")

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    assert answer.run()["yn"] in ("yes", "no")
    bad = client.with_options(max_retries=0)
    import openai

    with pytest.raises(openai.BadRequestError, match="response_format"):
        bad.chat.completions.create(model=NAME, messages=msgs, max_tokens=4, response_format={"type": "yaml"})


@pytest.mark.parametrize("backend", ["sglang", "sglang-oai-chat"])
def test_sglang_bench_serving_runs_and_prints_the_accept_length(server, tmp_path, backend):
    """Issue 16 #5/#6: SGLang's own bench_serving, a short run, native and OpenAI chat backends. It
    sends fields at their defaults (return_routed_experts: false, ...) and reads the accept length
    from /server_info's internal_states."""
    import json
    import os
    import subprocess
    import sys

    from aurora_sgl import reference_model_path

    turns = [f"Write a short note about the number {i}." for i in range(6)]
    sharegpt = [
        {"id": str(i), "conversations": [{"from": "human", "value": t}, {"from": "gpt", "value": "Sure. " * 12}]}
        for i, t in enumerate(turns)
    ]
    data = tmp_path / "sharegpt.json"
    data.write_text(json.dumps(sharegpt))
    cmd = [sys.executable, "-m", "sglang.bench_serving", "--backend", backend, "--base-url", server.url,
           "--dataset-name", "sharegpt", "--dataset-path", str(data), "--num-prompts", "6",
           "--sharegpt-output-len", "16", "--tokenizer", reference_model_path(),
           "--output-file", str(tmp_path / "bench.jsonl")]  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, (res.stdout[-1500:], res.stderr[-1500:])
    lines = dict(line.split(":", 1) for line in res.stdout.splitlines() if ":" in line)
    assert int(lines["Successful requests"]) == 6, res.stdout[-1500:]
    assert 1.0 < float(lines["Accept length"]) <= 5.0, res.stdout[-1500:]
    assert (tmp_path / "bench.jsonl").is_file()  # its results file, not in the working directory
