"""Hostile input against the real server: hand-written cases the issue names, property-based bodies
(hypothesis), and admission control. Every bad request gets a 4xx OpenAI-shaped JSON error within a
bounded time, nothing gets a 500, and the server keeps answering exactly afterwards."""

import asyncio
import json
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aurora_sgl import reference_head_path
from benchmarks.common.server import ServerProcess

RUNNING, QUEUED = 2, 2
TIMEOUT_S = 60  # "bounded time": every answer, good or bad, well inside this
PROBE = {"prompt": "def add(a, b):\n", "max_tokens": 24, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(
        "--speculative-num-steps",
        "4",
        "--speculative-draft-model-path",
        reference_head_path(),
        "--max-running-requests",
        str(RUNNING),
        "--max-queued-requests",
        str(QUEUED),
        "--no-online",
    )
    s.probe_text = httpx.post(s.url + "/v1/completions", json=PROBE, timeout=TIMEOUT_S).json()["choices"][0]["text"]
    yield s
    s.stop()


def _assert_error(r: httpx.Response, status: int | None = None) -> None:
    assert 400 <= r.status_code < 500 and r.status_code != 499, (r.status_code, r.text[:300])
    if status is not None:
        assert r.status_code == status, r.text[:300]
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and err["message"], err


def _assert_healthy(s) -> None:
    assert httpx.get(s.url + "/health", timeout=5).status_code == 200
    deadline = time.monotonic() + 10
    while httpx.get(s.url + "/server_info", timeout=5).json()["num_in_flight_requests"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert httpx.get(s.url + "/server_info", timeout=5).json()["num_in_flight_requests"] == 0


def _chunked(total: int, piece: int = 1 << 20):
    """A body sent with Transfer-Encoding: chunked, so no Content-Length announces its size."""
    sent = 0
    while sent < total:
        yield b" " * piece
        sent += piece


NESTED = b"[" * 100_000 + b"]" * 100_000
HAND_CASES = [
    # name, path, body (bytes, or a generator for a chunked upload), status
    ("oversized body", "/v1/completions", b'{"prompt": "' + b"a" * (9 << 20) + b'"}', 413),
    ("oversized chunked body", "/v1/completions", "chunked", 413),
    ("huge max_tokens", "/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000}', 400),
    ("max_tokens past 64 bits", "/v1/completions", b'{"prompt": "x", "max_tokens": 100000000000000000000000}', 400),
    ("huge max_new_tokens", "/generate", b'{"text": "x", "sampling_params": {"max_new_tokens": 99999999}}', 400),
    (
        "huge chat max_completion_tokens",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 10000000}',
        400,
    ),
    ("negative temperature", "/v1/completions", b'{"prompt": "x", "temperature": -0.5}', 400),
    ("NaN top_p", "/v1/completions", b'{"prompt": "x", "top_p": NaN}', 400),
    ("infinite temperature", "/v1/completions", b'{"prompt": "x", "temperature": Infinity}', 400),
    ("overflowing float", "/v1/completions", b'{"prompt": "x", "temperature": 1e999}', 400),
    ("native NaN", "/generate", b'{"text": "x", "sampling_params": {"temperature": NaN}}', 400),
    ("negative top_k", "/generate", b'{"text": "x", "sampling_params": {"top_k": -7}}', 400),
    ("negative seed", "/v1/completions", b'{"prompt": "x", "seed": -1}', 400),
    ("zero n", "/v1/completions", b'{"prompt": "x", "n": 0}', 400),
    ("invalid UTF-8", "/v1/completions", b'{"prompt": "\xff\xfe bad"}', 400),
    ("lone surrogate", "/v1/completions", b'{"prompt": "\\ud800"}', 400),
    ("deeply nested JSON", "/v1/completions", b'{"prompt": "x", "user": ' + NESTED + b"}", 400),
    ("deeply nested prompt", "/v1/completions", b'{"prompt": ' + NESTED + b"}", 400),
    (
        "thousands of stop strings",
        "/v1/completions",
        json.dumps({"prompt": "x", "stop": [f"s{i}" for i in range(5000)]}).encode(),
        400,
    ),
    (
        "one enormous stop string",
        "/generate",
        json.dumps({"text": "x", "sampling_params": {"stop": "z" * 100_000}}).encode(),
        400,
    ),
    ("prompt longer than the context", "/v1/completions", json.dumps({"prompt": "word " * 5000}).encode(), 400),
    ("input_ids longer than the context", "/generate", json.dumps({"input_ids": [5] * 3000}).encode(), 400),
    (
        "chat longer than the context",
        "/v1/chat/completions",
        json.dumps({"messages": [{"role": "user", "content": "word " * 5000}], "max_tokens": 4}).encode(),
        400,
    ),
    (
        "non-string text part",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}',
        400,
    ),
    ("batch beyond capacity", "/generate", json.dumps({"text": ["x"] * 500}).encode(), 400),
    # Issue 18: parameters the server does not honour are refused by name, never ignored.
    ("best_of", "/v1/completions", b'{"prompt": "x", "best_of": 3}', 400),
    ("logit_bias past 100", "/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 1000}}', 400),
    ("logit_bias key not a token id", "/v1/completions", b'{"prompt": "x", "logit_bias": {"five": 1}}', 400),
    ("logit_bias key out of the vocabulary", "/v1/completions", b'{"prompt": "x", "logit_bias": {"10000000": 1}}', 400),
    (
        "frequency_penalty past 2",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": 2.5}',
        400,
    ),
    ("min_tokens above max_tokens", "/v1/completions", b'{"prompt": "x", "max_tokens": 4, "min_tokens": 8}', 400),
    ("native repetition_penalty 0", "/generate", b'{"text": "x", "sampling_params": {"repetition_penalty": 0}}', 400),
    (
        "tools",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], '
        b'"tools": [{"type": "function", "function": {"name": "f"}}]}',
        400,
    ),
    (
        "image part",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"type": "text", '
        b'"text": "what is this"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]}',
        400,
    ),
    (
        "part without a type",
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": [{"text": "hi"}]}]}',
        400,
    ),
    ("native unknown field", "/generate", b'{"text": "x", "no_such_field": 1}', 400),
    ("native lora_path", "/generate", b'{"text": "x", "lora_path": "adapter"}', 400),
    # One rule, one code, whatever the route.
    ("seed past 64 bits", "/v1/completions", b'{"prompt": "x", "seed": 18446744073709551616}', 400),
    ("native seed past 64 bits", "/generate", b'{"text": "x", "sampling_params": {"seed": 18446744073709551616}}', 400),
    ("input id 2**63", "/generate", b'{"input_ids": [9223372036854775808]}', 400),
    ("input id 2**70", "/generate", b'{"input_ids": [1180591620717411303424]}', 400),
    (
        "stop token out of the vocabulary",
        "/generate",
        b'{"text": "x", "sampling_params": {"stop_token_ids": [10000000]}}',
        400,
    ),
    (
        "100000 stop tokens",
        "/v1/completions",
        json.dumps({"prompt": "x", "stop_token_ids": [5] * 100_000}).encode(),
        400,
    ),
    ("JSON array body", "/v1/chat/completions", b"[]", 400),
    ("empty body", "/v1/completions", b"", 400),
    ("unknown route", "/v1/engines", b"{}", 404),
]


@pytest.mark.parametrize("name,path,body,status", HAND_CASES, ids=[c[0] for c in HAND_CASES])
def test_hand_written_hostile_cases(server, name, path, body, status):
    content = _chunked(16 << 20) if body == "chunked" else body
    t0 = time.monotonic()
    r = httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, timeout=TIMEOUT_S)
    assert time.monotonic() - t0 < TIMEOUT_S
    _assert_error(r, status)
    _assert_healthy(server)


def test_tiny_temperature_is_greedy_not_nan(server):
    """1e-300 overflows float32 logits / T to inf (NaN probabilities, token id V-1 every time):
    below 1e-6 the server samples greedily, as SGLang does."""
    r = httpx.post(server.url + "/v1/completions", json=dict(PROBE, temperature=1e-300), timeout=TIMEOUT_S)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == server.probe_text


# ---- property-based: arbitrary mixes of valid and hostile fields -------------------------------
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
prompt_text = st.text(max_size=60)  # any code points, lone surrogates included (sent escaped)
max_tokens = st.one_of(st.integers(-3, 6), st.integers(2049, 2**66), junk)
sampling = {
    "max_tokens": max_tokens,
    "temperature": st.one_of(st.floats(-1, 3), junk),
    "top_p": st.one_of(st.floats(-1, 2), junk),
    "top_k": st.one_of(st.integers(-3, 10_000), junk),
    "n": st.one_of(st.integers(-1, 20), junk),
    "stop": st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=80), junk),
    "stop_token_ids": st.one_of(st.lists(st.integers(-2, 7000), max_size=5), junk),
    "seed": st.one_of(st.integers(-5, 2**64), junk),
    "stream": st.one_of(st.booleans(), junk),
    "ignore_eos": st.one_of(st.booleans(), junk),
    "model": st.one_of(st.just("reference_model"), junk),
    "logprobs": junk,
    "echo": junk,
}
completion = st.fixed_dictionaries(
    {
        "prompt": st.one_of(
            prompt_text, st.lists(prompt_text, max_size=3), st.lists(st.integers(-5, 7000), max_size=8), junk
        )
    },
    optional=sampling,
)
message = st.fixed_dictionaries(
    {
        "role": st.one_of(st.sampled_from(["user", "system", "assistant"]), junk),
        "content": st.one_of(
            prompt_text,
            st.lists(st.dictionaries(st.sampled_from(["type", "text"]), st.one_of(st.just("text"), junk)), max_size=2),
            junk,
        ),
    }
)
chat = st.fixed_dictionaries(
    {
        "messages": st.one_of(st.lists(message, max_size=3), junk),
        "max_tokens": st.one_of(st.integers(-3, 6), st.integers(2049, 2**66), junk),
    },
    optional={k: v for k, v in sampling.items() if k != "max_tokens"},
)
native = st.fixed_dictionaries(
    {},
    optional={
        "text": st.one_of(prompt_text, st.lists(prompt_text, max_size=3), junk),
        "input_ids": st.one_of(st.lists(st.integers(-5, 7000), max_size=8), junk),
        "stream": st.one_of(st.booleans(), junk),
        "sampling_params": st.one_of(
            st.fixed_dictionaries(
                {},
                optional={
                    "max_new_tokens": max_tokens,
                    "temperature": sampling["temperature"],
                    "top_p": sampling["top_p"],
                    "top_k": sampling["top_k"],
                    "stop": sampling["stop"],
                    "seed": sampling["seed"],
                    "regex": st.one_of(st.none(), st.text(max_size=4)),
                    "min_p": junk,
                },
            ),
            junk,
        ),
    },
)
bodies = st.one_of(
    st.tuples(st.just("/v1/completions"), completion),
    st.tuples(st.just("/v1/chat/completions"), chat),
    st.tuples(st.just("/generate"), native),
)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(case=bodies)
def test_property_any_body_gets_json_and_never_a_500(server, case):
    path, body = case
    raw = json.dumps(body, allow_nan=True).encode()  # NaN / Infinity literals and \ud800 escapes on purpose
    with httpx.stream(
        "POST", server.url + path, content=raw, timeout=TIMEOUT_S, headers={"Content-Type": "application/json"}
    ) as r:
        data = r.read()
    assert r.status_code in (200, 400, 404, 413, 422), (r.status_code, data[:300])
    if r.status_code != 200:
        err = json.loads(data)["error"]
        assert set(err) == {"message", "type", "code"} and err["message"]
    elif r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in data.decode().splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and all("error" not in json.loads(e) for e in events[:-1])
    else:
        assert "error" not in json.loads(data)


def test_server_still_exact_after_the_barrage(server):
    _assert_healthy(server)
    r = httpx.post(server.url + "/v1/completions", json=PROBE, timeout=TIMEOUT_S)
    assert r.json()["choices"][0]["text"] == server.probe_text


# ---- admission control --------------------------------------------------------------------------
def test_admission_control_answers_503_with_retry_after(server):
    """Beyond RUNNING slots + QUEUED waiting, requests get 503 + Retry-After at once; the admitted
    ones finish exactly and the server never holds more than its capacity."""
    body = {"prompt": PROBE["prompt"], "max_tokens": 24, "temperature": 0}

    async def one(c):
        return await c.post(server.url + "/v1/completions", json=body)

    async def run():
        async with httpx.AsyncClient(timeout=TIMEOUT_S, limits=httpx.Limits(max_connections=64)) as c:
            return await asyncio.gather(*(one(c) for _ in range(16)))

    rs = asyncio.run(run())
    ok = [r for r in rs if r.status_code == 200]
    busy = [r for r in rs if r.status_code == 503]
    assert len(ok) + len(busy) == len(rs), [r.status_code for r in rs]
    assert len(ok) >= RUNNING + QUEUED and busy, (len(ok), len(busy))
    assert all(r.json()["choices"][0]["text"] == server.probe_text for r in ok)
    for r in busy:
        assert r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "service_unavailable"
    # The server's own high-water mark (every submit, not a 10 ms sample): the burst reached the
    # capacity and never passed it.
    assert httpx.get(server.url + "/server_info").json()["peak_in_flight_requests"] == RUNNING + QUEUED
    metrics = httpx.get(server.url + "/metrics").text
    assert f"aurora_requests_rejected_total {float(len(busy))}" in metrics
    _assert_healthy(server)
    # More choices in one call than the server can ever hold: 400, retrying would not help.
    _assert_error(httpx.post(server.url + "/v1/completions", json={"prompt": "x", "n": 16, "max_tokens": 2}), 400)
    # Capacity frees up: the next request is served.
    assert httpx.post(server.url + "/v1/completions", json=body, timeout=TIMEOUT_S).status_code == 200


# ---- security ------------------------------------------------------------------------------------
def test_api_key_guards_every_route_and_the_default_bind_is_loopback():
    import psutil

    s = ServerProcess("--api-key", "sekret", "--speculative-num-steps", "2", "--no-online")
    try:
        auth = {"Authorization": "Bearer sekret"}
        for scheme in ("bearer", "BEARER", "Bearer"):  # the scheme is case-insensitive (RFC 9110)
            r = httpx.get(s.url + "/v1/models", headers={"Authorization": f"{scheme} sekret"})
            assert r.status_code == 200, scheme
        schema = httpx.get(s.url + "/openapi.json", headers=auth).json()
        routes = [(m.upper(), p) for p, ops in schema["paths"].items() for m in ops]
        routes += [("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc")]
        assert len(routes) >= 15, routes
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
                r = httpx.request(method, s.url + path, headers=headers, json={})
                if path == "/health":
                    assert r.status_code == 200
                else:
                    assert r.status_code == 401, (method, path, r.status_code)
                    assert r.json()["error"]["type"] == "authentication_error"
        listening = [
            c.laddr for c in psutil.Process(s.proc.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
        ]
        assert listening and all(a.ip == "127.0.0.1" for a in listening), listening
    finally:
        s.stop()


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-queued-requests", "-1"], "--max-queued-requests must be at least 0"),
        (["--trainer-config", "[1, 2]"], "--trainer-config must be a JSON object"),
        (["--trainer-config", '{"checkpoint_every": 0}'], "checkpoint_every must be a positive integer"),
        (["--trainer-config", '{"adam_beta2": 1.0}'], "adam_beta2 must be a number in (0, 1)"),
        (["--trainer-config", '{"nice": 20}'], "nice must be an integer in [0, 19]"),
        (["--trainer-config", '{"no_such_setting": 1}'], "no_such_setting"),
        (["--no-online", "--trainer-config", "{}"], "--trainer-config is only used with --online"),
        (["--api-key", ""], "--api-key must not be empty"),
        (["--speculative-explore-every", "0"], "--speculative-explore-every must be at least 1"),
        (["--speculative-explore-share", "-1"], "--speculative-explore-share must be between 0 and 100"),
        (
            ["--no-speculative-adaptive", "--speculative-explore-share", "1"],
            "it needs --backend embedded and adaptive on",
        ),
        (["--backend", "sglang", "--speculative-explore-every", "4"], "it needs --backend embedded and adaptive on"),
        (["--no-online", "--context-length", "4096"], "exceeds the model's 2048 positions"),
        (["--fallback-head"], "--fallback-head keeps the start head beside the live one"),  # no draft path
        (["--backend", "sglang", "--fallback-head"], "SGLang serves one draft model"),
    ],
)
def test_cli_refuses_bad_admission_and_trainer_settings(argv, message, capsys):
    from aurora_sgl.launch_server import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_refusals_name_what_they_refuse(server):
    def post(path, body):
        r = httpx.post(server.url + path, json=body, timeout=TIMEOUT_S)
        _assert_error(r, 400)
        return r.json()["error"]

    assert "best_of" in post("/v1/completions", {"prompt": "x", "best_of": 2})["message"]
    err = post("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})
    assert "messages[0].content[0]" in err["message"] and "image_url" in err["message"]
    assert (
        "stop_token_ids" in post("/generate", {"text": "x", "sampling_params": {"stop_token_ids": [10**7]}})["message"]
    )
    # Neutral values of fields OpenAI clients send are not refusals.
    ok = {"prompt": "x", "max_tokens": 2, "best_of": 1, "frequency_penalty": 0, "logit_bias": {}, "temperature": 0}
    assert httpx.post(server.url + "/v1/completions", json=ok, timeout=TIMEOUT_S).status_code == 200


def test_a_prompt_that_cannot_fit_is_refused_before_it_is_tokenized(server):
    # Issue 18: 7 M characters (under the body limit) were tokenized on the event loop for ~10 s.
    body = {"messages": [{"role": "user", "content": "x" * 7_000_000}], "max_tokens": 4}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S)
    _assert_error(r, 400)
    err = r.json()["error"]
    assert err["code"] == "context_length_exceeded" and "7000000 characters" in err["message"], err
    r = httpx.post(server.url + "/generate", json={"text": "y" * 7_000_000}, timeout=TIMEOUT_S)
    _assert_error(r, 400)
    assert "characters" in r.json()["error"]["message"]
    _assert_healthy(server)


def test_usage_counts_the_prompt_once_and_models_retrieve_works(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    one = client.completions.create(model="reference_model", prompt="def add(a, b):", max_tokens=2, temperature=0)
    four = client.completions.create(model="reference_model", prompt="def add(a, b):", max_tokens=2, temperature=0, n=4)
    assert four.usage.prompt_tokens == one.usage.prompt_tokens
    assert four.usage.completion_tokens == 4 * one.usage.completion_tokens
    card = client.models.retrieve("reference_model")
    assert card.id == "reference_model"
    r = httpx.get(server.url + "/v1/models/no-such-model", timeout=10)
    _assert_error(r, 404)


def test_every_field_of_sglangs_request_classes_is_honoured_or_refused(server):
    """Issue 16 #4: walk the fields of SGLang 0.5.23's own request classes (its OpenAI protocol
    models, GenerateReqInput, SamplingParams). Each is either one this server declares and honours
    (tested where it is implemented) or, sent with a value that is not its default, a 400 naming it:
    never accepted and ignored."""
    import dataclasses

    from sglang.srt.entrypoints.openai import protocol as sgl_openai
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams as SglSamplingParams

    from aurora_sgl.serving import protocol as ours

    probe = "aurora-probe"  # not the default or neutral value of any field
    routes = [
        ("/v1/chat/completions", sgl_openai.ChatCompletionRequest.model_fields, ours.ChatCompletionRequest.model_fields,
         {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
        ("/v1/completions", sgl_openai.CompletionRequest.model_fields, ours.CompletionRequest.model_fields,
         {"prompt": "hi", "max_tokens": 2}),
        ("/generate", {f.name for f in dataclasses.fields(GenerateReqInput)}, ours.NativeGenerateRequest.model_fields,
         {"text": "hi", "sampling_params": {"max_new_tokens": 2}}),
    ]  # fmt: skip
    refused = []
    for path, theirs, declared, base in routes:
        for name in sorted(set(theirs) - set(declared)):
            r = httpx.post(server.url + path, json={**base, name: probe}, timeout=TIMEOUT_S)
            _assert_error(r, 400)
            assert name in r.json()["error"]["message"], (path, name, r.text[:300])
            refused.append((path, name))
    # SamplingParams' request keys (its struct also holds derived state, never sent by a client).
    derived = {"stop_strs", "stop_regex_strs", "stop_str_max_len", "stop_regex_max_len", "is_normalized"}
    keys = set(SglSamplingParams.__struct_fields__) - derived
    honoured = ours._NATIVE_KEYS | {"sampling_seed"}
    for name in sorted(keys - honoured):
        body = {"text": "hi", "sampling_params": {"max_new_tokens": 2, name: probe}}
        r = httpx.post(server.url + "/generate", json=body, timeout=TIMEOUT_S)
        _assert_error(r, 400)
        assert name in r.json()["error"]["message"], (name, r.text[:300])
        refused.append(("sampling_params", name))
    # The fields of SGLang's chat message, on a message: a template would drop them silently.
    message_fields = set(sgl_openai.ChatCompletionMessageGenericParam.model_fields)
    for name in sorted(message_fields - set(ours.ChatMessage.model_fields)):
        body = {"messages": [{"role": "user", "content": "hi", name: probe}], "max_tokens": 2}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=TIMEOUT_S)
        _assert_error(r, 400)
        assert f"messages[0].{name}" in r.json()["error"]["message"], (name, r.text[:300])
        refused.append(("message", name))
    assert {"tool_calls", "tool_call_id", "name"} <= {n for where, n in refused if where == "message"}
    assert len(refused) > 60  # the walk really covered SGLang's classes
    # sampling_seed is SGLang's spelling of the seed: honoured as the seed.
    sampled = {"text": "def f(x):", "sampling_params": {"max_new_tokens": 8, "temperature": 1.0}}
    texts = [
        httpx.post(server.url + "/generate", json={**sampled, "sampling_params": {**sampled["sampling_params"], **sp}},
                   timeout=TIMEOUT_S).json()["text"]
        for sp in ({"seed": 11}, {"sampling_seed": 11}, {"sampling_seed": 12})
    ]  # fmt: skip
    assert texts[0] == texts[1] != texts[2], texts
    _assert_healthy(server)
