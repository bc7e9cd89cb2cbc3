"""The real server (uvicorn subprocess) on the reference model, through real clients: the openai
package, SGLang's frontend language, raw httpx SSE, and Prometheus' text parser."""

import asyncio
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from aurora_sgl import reference_head_path, reference_model_path
from benchmarks.common.server import ServerProcess

NAME = "reference_model"
PROMPTS = [
    "def add(a, b):\n",
    "Question: Sam has 5 pens and buys 3 more. How many pens does he have?\nAnswer:",
    "KING HENRY:\n",
    "import os\nimport sys\n\n\ndef main():\n",
    "The json module",
]


@pytest.fixture(scope="module")
def server():
    s = ServerProcess(
        "--speculative-num-steps",
        "4",
        "--speculative-draft-model-path",
        reference_head_path(),
        "--max-running-requests",
        "16",
        "--no-online",
        # adaptive, probing every other step: tests that read a request's accept length must not
        # depend on whether this machine's timings make drafting pay
        "--speculative-explore-every",
        "2",
        "--speculative-explore-share",
        "100",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def greedy_reference():
    """Target-only greedy text from transformers itself, per prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(reference_model_path())
    model = AutoModelForCausalLM.from_pretrained(reference_model_path(), dtype=torch.float32).eval()

    def ref(prompt: str, max_new: int) -> str:
        ids = tok(prompt, return_tensors="pt", add_special_tokens=not prompt.startswith(tok.bos_token)).input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id)
        seq = out[0, ids.shape[1] :].tolist()
        if tok.eos_token_id in seq:
            seq = seq[: seq.index(tok.eos_token_id)]
        return tok.decode(seq, skip_special_tokens=True)

    ref.tokenizer = tok
    return ref


def test_openai_completions_equal_target_only(server, greedy_reference):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [NAME]
    for p in PROMPTS:
        r = client.completions.create(model=NAME, prompt=p, max_tokens=40, temperature=0)
        assert r.choices[0].text == greedy_reference(p, 40)
        assert (
            r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        )
    # batch of prompts and n > 1
    r = client.completions.create(model=NAME, prompt=PROMPTS[:2], max_tokens=10, temperature=0, n=2)
    assert len(r.choices) == 4
    for c in r.choices:  # OpenAI's order: prompt-major, each prompt's n choices together
        assert c.text == greedy_reference(PROMPTS[c.index // 2], 10), c.index


def test_openai_chat_and_streaming(server, greedy_reference):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "What is 7 times 8?"}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=30, temperature=0)
    prompt = greedy_reference.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert r.choices[0].message.content == greedy_reference(prompt, 30)
    assert r.choices[0].message.role == "assistant"
    chunks = list(
        client.chat.completions.create(
            model=NAME, messages=msgs, max_tokens=30, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    stream = client.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=40, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == greedy_reference(PROMPTS[0], 40)
    # seeded sampling is reproducible
    a = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0.8, seed=7)
    b = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=20, temperature=0.8, seed=7)
    assert a.choices[0].text == b.choices[0].text
    # stop strings are honoured and trimmed
    full = greedy_reference(PROMPTS[3], 40)
    stop = full[10:14]
    if stop.strip():
        r = client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=40, temperature=0, stop=[stop])
        assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"


def _sse_events(lines):
    out = []
    for line in lines:
        if line.startswith("data: "):
            out.append(line[6:])
    return out


def test_native_generate_and_sse(server, greedy_reference):
    r = httpx.post(
        server.url + "/generate", json={"text": PROMPTS[1], "sampling_params": {"max_new_tokens": 40, "temperature": 0}}
    )
    body = r.json()
    assert body["text"] == greedy_reference(PROMPTS[1], 40)
    meta = body["meta_info"]
    for key in (
        "prompt_tokens",
        "completion_tokens",
        "spec_verify_ct",
        "spec_accept_length",
        "spec_accept_rate",
        "draft_version",
    ):
        assert key in meta
    assert meta["spec_accept_length"] >= 1.0 and meta["spec_verify_ct"] > 0
    ids = greedy_reference.tokenizer(PROMPTS[1])["input_ids"]
    r2 = httpx.post(
        server.url + "/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": 40, "temperature": 0}}
    )
    assert r2.json()["output_ids"] == body["output_ids"]
    batch = httpx.post(
        server.url + "/generate", json={"text": PROMPTS[:3], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}
    ).json()
    assert isinstance(batch, list) and len(batch) == 3
    with httpx.stream(
        "POST",
        server.url + "/generate",
        timeout=60,
        json={"text": PROMPTS[1], "stream": True, "sampling_params": {"max_new_tokens": 40, "temperature": 0}},
    ) as s:
        events = _sse_events(s.iter_lines())
    assert events[-1] == "[DONE]"
    texts = [json.loads(e)["text"] for e in events[:-1]]
    assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # cumulative
    assert texts[-1] == body["text"]


def test_sglang_frontend_language_program(server, greedy_reference):
    import sglang as sgl

    @sgl.function
    def complete(s, prompt):
        s += prompt
        s += sgl.gen("answer", max_tokens=24, temperature=0)

    sgl.set_default_backend(sgl.RuntimeEndpoint(server.url))
    state = complete.run(prompt=PROMPTS[0])
    assert state["answer"] == greedy_reference(PROMPTS[0], 24)
    streamed = complete.run(prompt=PROMPTS[2], stream=True)
    text = "".join(streamed.text_iter("answer"))
    assert text == greedy_reference(PROMPTS[2], 24)


def test_service_routes(server):
    info = httpx.get(server.url + "/get_model_info").json()
    assert info["model_path"] == reference_model_path() and info["is_generation"] is True
    assert httpx.get(server.url + "/model_info").json() == info  # SGLang's alias of the same route
    si = httpx.get(server.url + "/server_info").json()
    assert si["speculative_num_steps"] == 4 and si["backend"] == "embedded" and si["speculative_adaptive"] is True
    before = _metrics(server)
    r = httpx.get(server.url + "/health_generate", timeout=60)
    assert r.status_code == 200
    after = _metrics(server)  # it really generated: one request, one token
    assert after.get("aurora_requests_total", 0) - before.get("aurora_requests_total", 0) == 1
    assert after.get("aurora_generation_tokens_total", 0) - before.get("aurora_generation_tokens_total", 0) == 1
    r = httpx.post(server.url + "/flush_cache")
    assert (r.status_code, r.text) == (200, "Cache flushed.\n")  # SGLang's reply
    stats = httpx.get(server.url + "/aurora/stats").json()
    assert stats["speculative_num_steps"] == 4 and stats["draft_version"] == 0  # --no-online: never swapped
    assert stats["trainer"] == {"online": False} and stats["flywheel"] is None
    assert stats["accept_length"]["window_size"] > 0 and isinstance(stats["accept_length"]["history"], list)
    adaptive = stats["adaptive"]  # the cost model the per-step K is chosen with
    assert adaptive["k_max"] == 4 and len(adaptive["expected_tokens_per_k"]) == 5
    # a calibrated cost for every K the chooser may pick, in every batch bucket up to 16 requests
    assert set(adaptive["step_cost"]["ms"]) == {f"b{b}_k{k}" for b in (1, 2, 4, 8, 16) for k in range(5)}


def test_metrics_parse_and_count(server):
    before = _metrics(server)
    n, m = 3, 7  # a known sequence: n requests of exactly m tokens each
    prompt_tokens = drafted = 0
    for p in PROMPTS[:n]:
        params = {"max_new_tokens": m, "temperature": 0, "ignore_eos": True}
        out = httpx.post(server.url + "/generate", json={"text": p, "sampling_params": params}, timeout=120).json()
        assert len(out["output_ids"]) == m
        prompt_tokens += out["meta_info"]["prompt_tokens"]
        assert out["meta_info"]["spec_draft_head"] == "live"  # no fallback without online training
        drafted += out["meta_info"]["spec_verify_ct"] > 0
    after = _metrics(server)

    def delta(name):
        return after[name] - before.get(name, 0)

    assert delta("aurora_requests_total") == n
    assert delta("aurora_generation_tokens_total") == n * m
    assert delta("aurora_prompt_tokens_total") == prompt_tokens
    assert delta("aurora_time_to_first_token_seconds_count") == n
    assert delta("aurora_draft_head_requests_total") == drafted
    for name in (
        "aurora_time_to_first_token_seconds_count",
        "aurora_time_per_output_token_seconds_count",
        "aurora_spec_accept_length_count",
        "aurora_spec_accept_rate_count",
        "aurora_draft_version",
        "aurora_trainer_steps",
        "aurora_trainer_loss",
        "aurora_ring_drops",
        "aurora_draft_swaps",
        "aurora_draft_rollbacks",
        "aurora_last_swap_pause_seconds",
        "aurora_prompt_tokens_total",
    ):
        assert name in after, name
    assert "aurora_spec_accept_rate_per_position" in after
    assert after["aurora_spec_decode_steps_by_k"] > before.get("aurora_spec_decode_steps_by_k", 0)


def _metrics(server) -> dict:
    """Sample name -> value summed over its label sets."""
    out = {}
    for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
        for sample in fam.samples:
            out[sample.name] = out.get(sample.name, 0) + sample.value
    return out


def test_concurrent_streams_with_disconnects(server, greedy_reference):
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
    expected = {p: greedy_reference(p, 48) for p in set(prompts)}

    async def client(i, p):
        async with httpx.AsyncClient(timeout=120) as c:
            body = {"model": NAME, "prompt": p, "max_tokens": 48, "temperature": 0, "stream": True}
            async with c.stream("POST", server.url + "/v1/completions", json=body) as r:
                text = ""
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    text += json.loads(line[6:])["choices"][0]["text"]
                    if i % 3 == 0 and len(text) > 3:
                        return None  # hang up mid-stream
                return text

    async def run_all():
        return await asyncio.gather(*(client(i, p) for i, p in enumerate(prompts)))

    results = asyncio.run(run_all())
    for i, (p, text) in enumerate(zip(prompts, results)):
        if i % 3:
            assert text == expected[p], i
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = httpx.get(server.url + "/server_info").json()
        if info["num_running_requests"] == 0 and info["num_in_flight_requests"] == 0:
            break
        time.sleep(0.2)
    assert info["num_running_requests"] == 0 and info["num_waiting_requests"] == 0


@pytest.mark.parametrize(
    "path,body,status",
    [
        ("/v1/completions", b"{not json", 400),
        ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', 422),
        ("/v1/completions", b'{"prompt": 5}', 422),
        ("/v1/completions", b'{"prompt": "x", "top_p": 3}', 400),
        ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400),
        ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": -5}', 400),
        ("/v1/completions", b'{"prompt": "x", "n": 100}', 400),
        ("/v1/completions", b'{"prompt": "x", "model": "gpt-4"}', 404),
        ("/v1/chat/completions", b'{"messages": []}', 422),
        ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', 422),
        ("/generate", b'{"sampling_params": {"max_new_tokens": 3}}', 400),
        ("/generate", b'{"text": "x", "sampling_params": {"temperature": "hot"}}', 400),
        ("/generate", b'{"text": "x", "sampling_params": {"regex": "(unclosed"}}', 400),
        ("/generate", b'{"input_ids": [1, 999999]}', 400),
        ("/generate", b"[1, 2]", 400),
    ],
)
def test_errors_are_openai_shaped(server, path, body, status):
    r = httpx.post(server.url + path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and err["message"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_prompt_longer_than_context(server):
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "word " * 5000, "max_tokens": 4})
    assert r.status_code == 400 and "context length" in r.json()["error"]["message"]


def test_readme_examples_run_against_the_server(server):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    curl = re.search(r"<!-- api-example: curl -->\n```bash\n(.*?)```", readme, re.S).group(1)
    py = re.search(r"<!-- api-example: python -->\n```python\n(.*?)```", readme, re.S).group(1)
    curl = curl.replace("http://127.0.0.1:30000", server.url).replace("\\\n", " ")
    out = subprocess.run(curl, shell=True, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and json.loads(out.stdout)["choices"][0]["text"]
    py = py.replace("http://127.0.0.1:30000", server.url)
    out = subprocess.run([sys.executable, "-c", py], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip(), out.stderr


def test_api_key_and_sigterm_drain():
    s = ServerProcess("--api-key", "sekret", "--speculative-num-steps", "2", "--no-online")
    try:
        assert httpx.get(s.url + "/health").status_code == 200  # health stays open
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(s.url + "/v1/completions", json={"prompt": "x"}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert httpx.get(s.url + "/metrics").status_code == 401
        ok = httpx.post(
            s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, headers={"Authorization": "Bearer sekret"}
        )
        assert ok.status_code == 200
        # A stream in flight when SIGTERM arrives still completes.
        with httpx.stream(
            "POST",
            s.url + "/generate",
            timeout=60,
            headers={"Authorization": "Bearer sekret"},
            json={
                "text": "def f(x):",
                "stream": True,
                "sampling_params": {"max_new_tokens": 64, "ignore_eos": True, "temperature": 0},
            },
        ) as r:
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert json.loads(rest[-2][6:])["meta_info"]["completion_tokens"] == 64 and first
        # uvicorn re-raises the signal after its graceful shutdown, so the exit is "killed by SIGTERM"
        assert s.proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        s.stop()


def test_batch_with_one_bad_prompt_is_refused_whole(server):
    r = httpx.post(
        server.url + "/generate",
        json={"text": ["ok prompt", "word " * 5000], "sampling_params": {"max_new_tokens": 64, "ignore_eos": True}},
    )
    assert r.status_code == 400
    import time

    time.sleep(0.5)
    info = httpx.get(server.url + "/server_info").json()
    assert info["num_running_requests"] == 0 and info["num_waiting_requests"] == 0


def test_connections_that_never_finish_their_headers_are_closed():
    # Issue 18: an idle connection, or one that sent half its headers, stayed open forever.
    import socket

    s = ServerProcess("--speculative-num-steps", "2", "--no-online", env={"AURORA_SGL_HEADER_TIMEOUT_S": "2"})
    try:
        idle = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        half = socket.create_connection(("127.0.0.1", s.port), timeout=30)
        half.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        assert idle.recv(1) == b"" and half.recv(1) == b""  # closed by the server (recv would time out)
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "x", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200
        idle.close()
        half.close()
    finally:
        s.stop()


def _in_flight(server) -> int:
    return httpx.get(server.url + "/server_info", timeout=10).json()["num_in_flight_requests"]


@pytest.mark.parametrize("route", ["/v1/completions", "/generate"])
def test_hanging_up_a_long_stream_aborts_it(server, route):
    # Issue 17: requests that finish on their own before the check cannot tell an abort from no
    # abort. 1500 tokens take far longer than the bound below; a no-op abort leaves it running.
    import socket

    body = (
        {"prompt": "def f(x):", "max_tokens": 1500, "ignore_eos": True, "stream": True, "temperature": 0}
        if route == "/v1/completions"
        else {"text": "def f(x):", "stream": True, "sampling_params": {"max_new_tokens": 1500, "ignore_eos": True}}
    )
    payload = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=60)
    sock.sendall(
        f"POST {route} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n".encode()
        + payload
    )
    assert b"data:" in sock.recv(4096) or b"data:" in sock.recv(4096)  # the stream has started
    assert _in_flight(server) == 1
    sock.shutdown(socket.SHUT_RDWR)  # a real hang-up
    sock.close()
    deadline = time.monotonic() + 10
    while _in_flight(server) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _in_flight(server) == 0


def test_server_info_carries_sglangs_internal_states(server):
    # Issue 16 #5: SGLang's bench_serving reads internal_states[0].avg_spec_accept_length.
    r = httpx.post(server.url + "/generate", json={"text": PROMPTS[0], "sampling_params": {"max_new_tokens": 16}})
    tau = r.json()["meta_info"]["spec_accept_length"]
    states = httpx.get(server.url + "/server_info").json()["internal_states"]
    avg = states[0]["avg_spec_accept_length"]
    assert isinstance(avg, float) and 1.0 <= avg <= 5.0 and 1.0 <= tau <= 5.0, (avg, tau)
    assert states[0]["speculative_num_steps"] == 4


def test_native_rid_is_the_request_id(server):
    # SGLang's `rid` was accepted and ignored; now it names the request (meta_info "id").
    r = httpx.post(
        server.url + "/generate", json={"text": "x", "rid": "my-req", "sampling_params": {"max_new_tokens": 2}}
    )
    assert r.status_code == 200 and r.json()["meta_info"]["id"] == "my-req"
    batch = httpx.post(
        server.url + "/generate",
        json={"text": ["x", "y"], "rid": ["a1", "b2"], "sampling_params": {"max_new_tokens": 2}},
    )
    assert [o["meta_info"]["id"] for o in batch.json()] == ["a1", "b2"]
    for bad in ({"text": ["x", "y"], "rid": ["same", "same"]}, {"text": ["x", "y"], "rid": "one"}):
        assert httpx.post(server.url + "/generate", json=bad).status_code == 400
