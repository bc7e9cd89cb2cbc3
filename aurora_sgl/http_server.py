"""HTTP API on the embedded engine: OpenAI-compatible routes, SGLang's native routes, metrics.

Every error is OpenAI-shaped JSON, {"error": {"message", "type", "code"}}. A client that goes away
(stream closed, or a blocking request's connection dropped) aborts its request, which frees its
slot at the next engine step. Admission control bounds memory under overload: beyond the running
slots plus `max_queued_requests` waiting, a request gets 503 with Retry-After instead of a queue
that grows without limit.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import AsyncIterator

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .api_protocol import (MAX_N, APIError, ChatCompletionRequest, CompletionRequest, NativeGenerateRequest, error_body,
                           native_sampling_params)
from .async_engine import AsyncEngine
from .engine import PromptTooLong
from .metrics import Metrics
from .sampling import SamplingParams

OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
NATIVE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default for /generate
RETRY_AFTER_S = 1  # a slot frees within about one request's decode time on this engine
POLL_DISCONNECT_S = 0.5
_TYPE_LABELS = {"int", "float", "str", "bool", "dict", "list", "none"}


class ClientGone(Exception):
    pass


class OrjsonResponse(JSONResponse):
    def render(self, content) -> bytes:
        return orjson.dumps(content)


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
           headers: dict | None = None):
    return OrjsonResponse(error_body(status, message, type_, code), status_code=status, headers=headers)


def _sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to stream yet: an undecoded byte sequence, or the start
    of a stop string that the final text might trim."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def create_app(aengine: AsyncEngine, metrics: Metrics, *, served_model_name: str, model_path: str,
               api_key: str | None = None, max_body_bytes: int = 8 << 20, server_args: dict | None = None,
               flywheel=None, trainer_state=None, max_queued_requests: int = 128) -> FastAPI:
    """`flywheel` (engine side of online training) and `trainer_state` (a callable returning the
    trainer's status snapshot) are optional: without them the server runs a fixed draft head.
    At most `max_running_requests + max_queued_requests` requests are in flight at once."""
    engine = aengine.engine
    capacity = engine.max_running + max_queued_requests
    tokenizer = engine.tokenizer
    app = FastAPI(title="aurora_sgl", version=__version__, default_response_class=OrjsonResponse)
    created = int(time.time())
    server_args = server_args or {}

    # ---- middleware and error handlers ------------------------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health":
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return _error(401, "missing or invalid API key", "authentication_error", "invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return _error(413, f"request body larger than {max_body_bytes} bytes")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return _error(e.status, e.message, e.type, e.code, headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            return _error(400, "request body is not valid JSON")
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(422, f"{where or 'body'}: {first.get('msg', 'invalid value')}", code="invalid_type")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return _error(500, f"internal error: {type(e).__name__}", "internal_error")

    # ---- shared helpers ---------------------------------------------------------------------
    async def parse(model_cls, request: Request):
        """JSON body -> model, whatever the Content-Type (curl -d sends form encoding)."""
        raw = await read_body(request)
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise APIError(400, "request body is not valid JSON") from None
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            # Drop pydantic's union-member labels ("int", "list[str]") from the location.
            where = ".".join(str(p) for p in first.get("loc", ())
                             if not (isinstance(p, str) and (p in _TYPE_LABELS or "[" in p)))
            raise APIError(422, f"{where or 'body'}: {first.get('msg', 'invalid value')}", code="invalid_type") from None

    async def read_body(request: Request) -> bytes:
        """The body, refused past max_body_bytes while it arrives: a chunked upload has no
        Content-Length for the middleware to check."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_body_bytes:
                raise APIError(413, f"request body larger than {max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(name: str | None) -> None:
        if name is not None and name not in (served_model_name, model_path):
            raise APIError(404, f"model '{name}' does not exist; this server serves '{served_model_name}'",
                           "not_found_error", "model_not_found")

    def admit(n: int) -> None:
        """Refuse n new requests beyond the running slots plus the bounded queue. Runs on the event
        loop with no await before the submits that follow, so concurrent requests cannot both pass."""
        if n > capacity:
            raise APIError(400, f"{n} requests in one call exceed this server's capacity of {capacity}")
        if aengine.num_in_flight + n > capacity:
            metrics.rejected.inc(n)
            raise APIError(503, f"server is at capacity ({engine.max_running} running, {max_queued_requests} "
                                "queued); retry later", "service_unavailable", "server_overloaded")

    def submit(prompt, params: SamplingParams):
        if params.max_new_tokens > engine.context_length:
            raise APIError(400, f"max_tokens is {params.max_new_tokens}; this model's context length is "
                                f"{engine.context_length}", code="context_length_exceeded")
        try:
            return aengine.submit(prompt, params)
        except PromptTooLong as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def submit_all(pairs) -> list:
        """Submit (prompt, params) pairs; if one is refused, abort the ones already queued."""
        pairs = list(pairs)
        admit(len(pairs))
        jobs = []
        try:
            for prompt, params in pairs:
                jobs.append(submit(prompt, params))
        except BaseException:
            for r, _ in jobs:
                aengine.abort(r)
            raise
        return jobs

    async def collect_all(request: Request, jobs) -> bool:
        """Wait for every job; False if the client went away. Any failure aborts them all."""
        try:
            await asyncio.gather(*(collect(request, r, q) for r, q in jobs))
            return True
        except ClientGone:
            return False
        finally:
            for r, _ in jobs:
                if not r.finished:
                    aengine.abort(r)

    async def collect(request: Request, req, queue) -> None:
        """Wait for a blocking request to finish; abort it if the client disconnects."""
        try:
            while True:
                try:
                    update = await asyncio.wait_for(queue.get(), timeout=POLL_DISCONNECT_S)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ClientGone() from None
                    continue
                if update.finished:
                    break
        except (ClientGone, asyncio.CancelledError):
            aengine.abort(req)
            raise
        if req.finish_reason == "error":
            raise APIError(500, "the engine failed while running this request", "internal_error")

    async def text_updates(req, queue) -> AsyncIterator[tuple[str, bool]]:
        """(new text, finished) as tokens arrive; aborts the request if the consumer goes away."""
        sent = ""
        try:
            while True:
                update = await queue.get()
                if update.finished:
                    final = engine.output_text(req)
                    yield (final[len(sent):] if final.startswith(sent) else ""), True
                    return
                text = tokenizer.decode(update.token_ids, skip_special_tokens=True)
                text = text[:len(text) - _holdback(text, req.params.stop)]
                if len(text) > len(sent) and text.startswith(sent):
                    yield text[len(sent):], False
                    sent = text
        finally:
            if not req.finished:
                aengine.abort(req)

    def finish_reason(req) -> str:
        return "length" if req.finish_reason == "length" else "stop"

    def usage(reqs, prompt_reqs=None) -> dict:
        prompt = sum(len(r.prompt_ids) for r in (prompt_reqs or reqs))
        completion = sum(len(r.output_ids) for r in reqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    # ---- OpenAI ------------------------------------------------------------------------------
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "created": created,
                                            "owned_by": "aurora_sgl", "root": model_path,
                                            "max_model_len": engine.context_length}]}

    def completion_prompts(body: CompletionRequest) -> list:
        p = body.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise APIError(400, "prompt must not be empty")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)

    async def run_openai(request: Request, body, prompts: list, kind: str, default_max: int):
        check_model(body.model)
        if body.stream_options is not None and not body.stream:
            raise APIError(400, "stream_options is only allowed with stream=true")
        if not 1 <= body.n <= MAX_N:  # n = 0 would otherwise answer 200 with no choices
            raise APIError(400, f"n must be between 1 and {MAX_N}, got {body.n}")
        params = [body.sampling_params(default_max, j) for j in range(body.n)]
        jobs = submit_all((p, sp) for p in prompts for sp in params)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        obj = "chat.completion" if kind == "chat" else "text_completion"
        if not body.stream:
            if not await collect_all(request, jobs):
                return Response(status_code=499)
            choices = []
            for i, (r, _) in enumerate(jobs):
                text = engine.output_text(r)
                if kind == "chat":
                    choices.append({"index": i, "message": {"role": "assistant", "content": text},
                                    "finish_reason": finish_reason(r), "logprobs": None})
                else:
                    choices.append({"index": i, "text": text, "finish_reason": finish_reason(r), "logprobs": None})
            return {"id": rid, "object": obj, "created": int(time.time()), "model": served_model_name,
                    "choices": choices, "usage": usage([r for r, _ in jobs])}
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(stream_openai(jobs, rid, kind, include_usage), media_type="text/event-stream")

    async def stream_openai(jobs, rid: str, kind: str, include_usage: bool):
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        now = int(time.time())

        def chunk(i, text=None, reason=None, role=False):
            if kind == "chat":
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
                c = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                c = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": None}
            return _sse({"id": rid, "object": obj, "created": now, "model": served_model_name, "choices": [c]})

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, req, queue):
            try:
                async for text, done in text_updates(req, queue):
                    await merged.put((i, text, done, req))
            except Exception:  # never leave the response waiting for a choice that cannot finish
                req.finish_reason = "error"
                await merged.put((i, "", True, req))
        tasks = [asyncio.create_task(pump(i, r, q)) for i, (r, q) in enumerate(jobs)]
        try:
            if kind == "chat":
                for i in range(len(jobs)):
                    yield chunk(i, role=True)
            remaining = len(jobs)
            while remaining:
                i, text, done, req = await merged.get()
                if text:
                    yield chunk(i, text)
                if done:
                    remaining -= 1
                    if req.finish_reason == "error":
                        yield _sse(error_body(500, "the engine failed while running this request", "internal_error"))
                    yield chunk(i, None if kind == "chat" else "", finish_reason(req))
            if include_usage:
                yield _sse({"id": rid, "object": obj, "created": now, "model": served_model_name, "choices": [],
                            "usage": usage([r for r, _ in jobs])})
            yield b"data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for r, _ in jobs:
                if not r.finished:
                    aengine.abort(r)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse(CompletionRequest, request)
        if body.echo or body.logprobs or body.suffix:
            raise APIError(400, "echo, logprobs and suffix are not supported")
        return await run_openai(request, body, completion_prompts(body), "completion", OPENAI_DEFAULT_MAX_TOKENS)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse(ChatCompletionRequest, request)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported")
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        messages = []
        for m in body.messages:
            if isinstance(m.content, str):
                content = m.content
            else:
                texts = [part.get("text") for part in m.content if part.get("type") == "text"]
                if not all(isinstance(t, str) for t in texts):
                    raise APIError(400, "a text content part needs a string 'text'")
                content = "".join(texts)
            messages.append({"role": m.role, "content": content})
        try:
            prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # template errors are the caller's input problem
            raise APIError(400, f"chat template failed: {e}") from None
        default_max = max(1, engine.context_length - len(engine.encode(prompt)))
        return await run_openai(request, body, [prompt], "chat", default_max)

    # ---- SGLang native ----------------------------------------------------------------------
    @app.post("/generate")
    async def generate(request: Request):
        body = await parse(NativeGenerateRequest, request)
        if (body.text is None) == (body.input_ids is None):
            raise APIError(400, "give exactly one of text or input_ids")
        if body.return_logprob not in (False, [False]) and body.return_logprob:
            raise APIError(400, "return_logprob is not supported")
        if body.text is not None:
            batch = isinstance(body.text, list)
            prompts = body.text if batch else [body.text]
        else:
            batch = bool(body.input_ids) and isinstance(body.input_ids[0], list)
            prompts = body.input_ids if batch else [body.input_ids]
        if not prompts:
            raise APIError(400, "empty batch")
        sp = body.sampling_params
        sps = sp if isinstance(sp, list) else [sp] * len(prompts)
        if len(sps) != len(prompts):
            raise APIError(400, "sampling_params list must match the batch size")
        params = [native_sampling_params(s, min(NATIVE_DEFAULT_MAX_NEW_TOKENS, engine.context_length)) for s in sps]
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request")
        jobs = submit_all(zip(prompts, params))
        if body.stream:
            return StreamingResponse(stream_native(*jobs[0]), media_type="text/event-stream")
        if not await collect_all(request, jobs):
            return Response(status_code=499)
        out = [{"text": engine.output_text(r), "output_ids": list(r.output_ids), "meta_info": native_meta(r)}
               for r, _ in jobs]
        return out if batch else out[0]

    def native_meta(req) -> dict:
        meta = req.meta_info()
        fr = meta.pop("finish_reason")
        stop = meta.pop("matched_stop")
        meta["finish_reason"] = None if fr is None else (
            {"type": "length", "length": len(req.output_ids)} if fr == "length" else {"type": fr, "matched": stop})
        return meta

    async def stream_native(req, queue):
        text = ""
        try:
            async for delta, done in text_updates(req, queue):
                text += delta
                if delta or done:
                    yield _sse({"text": text, "output_ids": list(req.output_ids), "meta_info": native_meta(req)})
            yield b"data: [DONE]\n\n"
        finally:
            if not req.finished:
                aengine.abort(req)

    def model_info():
        return {"model_path": model_path, "tokenizer_path": model_path, "is_generation": True,
                "preferred_sampling_params": None, "served_model_name": served_model_name,
                "weight_version": str(engine.draft_version)}

    app.get("/get_model_info")(model_info)
    app.get("/model_info")(model_info)

    def server_info():
        info = dict(server_args)
        info.update(version=__version__, served_model_name=served_model_name, model_path=model_path,
                    backend="embedded", speculative_num_steps=engine.k, max_running_requests=engine.max_running,
                    context_length=engine.context_length, num_running_requests=aengine.num_running,
                    num_waiting_requests=aengine.num_waiting, num_in_flight_requests=aengine.num_in_flight,
                    draft_version=engine.draft_version, engine_healthy=aengine.last_error is None)
        return info

    app.get("/server_info")(server_info)
    app.get("/get_server_info")(server_info)

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate(request: Request):
        admit(1)
        req, queue = submit([tokenizer.bos_token_id or 0], SamplingParams(max_new_tokens=1, ignore_eos=True))
        try:
            await asyncio.wait_for(collect(request, req, queue), timeout=30)
        except (asyncio.TimeoutError, APIError):
            aengine.abort(req)
            return _error(503, "engine did not produce a token", "service_unavailable",
                          headers={"Retry-After": str(RETRY_AFTER_S)})
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        # The embedded engine keeps no cross-request prefix cache: nothing to flush.
        return PlainTextResponse("Cache flushed.\n")

    @app.get("/metrics")
    async def prometheus():
        metrics.running.set(aengine.num_running)
        metrics.waiting.set(aengine.num_waiting)
        metrics.draft_version.set(engine.draft_version)
        if flywheel is not None:
            fw = flywheel.stats()
            metrics.swaps.set(fw["swaps"])
            metrics.rollbacks.set(fw["rollbacks"])
            metrics.swap_pause.set(fw["last_swap_pause_s"])
            metrics.ring_drops.set(fw["ring_drops"])
        if trainer_state is not None:
            ts = trainer_state()
            metrics.train_steps.set(ts.get("train_steps") or 0)
            metrics.train_loss.set(ts.get("loss") or 0.0)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/aurora/stats")
    async def aurora_stats():
        return {"draft_version": engine.draft_version, "speculative_num_steps": engine.k,
                "accept_length": metrics.stats(),
                "flywheel": flywheel.stats() if flywheel is not None else None,
                "trainer": dict(trainer_state(), online=True) if trainer_state else {"online": False}}

    return app
