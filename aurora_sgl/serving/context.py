"""What every route needs: the engine, the limits, and the steps a request goes through
(parse -> admit -> submit -> collect or stream), held by one object instead of a closure.

Every error is OpenAI-shaped JSON, {"error": {"message", "type", "code"}}. A client that goes away
(stream closed, or a blocking request's connection dropped) aborts its request, which frees its
slot at the next engine step. Admission control bounds memory under overload: beyond the running
slots plus `max_queued_requests` waiting, a request gets 503 with Retry-After instead of a queue
that grows without limit.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from aurora_sgl.engine.engine import PromptTooLong
from aurora_sgl.engine.sampling import SamplingParams
from aurora_sgl.serving.async_engine import AsyncEngine
from aurora_sgl.serving.metrics import Metrics
from aurora_sgl.serving.protocol import APIError, error_body

RETRY_AFTER_S = 1  # a slot frees within about one request's decode time on this engine
POLL_DISCONNECT_S = 0.5
BODY_READ_TIMEOUT_S = 30.0  # between two chunks of a request body
_TYPE_LABELS = {"int", "float", "str", "bool", "dict", "list", "none"}


class ClientGone(Exception):
    pass


class OrjsonResponse(JSONResponse):
    def render(self, content) -> bytes:
        return orjson.dumps(content)


def error_response(
    status: int,
    message: str,
    type_: str = "invalid_request_error",
    code: str | None = None,
    headers: dict | None = None,
) -> OrjsonResponse:
    return OrjsonResponse(error_body(status, message, type_, code), status_code=status, headers=headers)


def sse(obj) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def holdback(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of `text` not to stream yet: an undecoded byte sequence, or the start
    of a stop string that the final text might trim."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def finish_reason(req) -> str:
    return "length" if req.finish_reason == "length" else "stop"


def usage(reqs, n: int = 1) -> dict:
    """Token counts of a call; `reqs` holds `n` choices per prompt, prompt by prompt, and each prompt
    is counted once (as OpenAI and SGLang do)."""
    prompt = sum(len(r.prompt_ids) for r in reqs[::n])
    completion = sum(len(r.output_ids) for r in reqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


MAX_JSON_DEPTH = 256
PARSE_INLINE_BYTES = 256 << 10
_LONG_DIGITS = re.compile(rb"\d{19,}")


def parse_json(raw: bytes):
    """The body as JSON. orjson refuses some legal JSON (integers beyond 64 bits, lone UTF-16
    surrogates, deep nesting); those get the same field checks as any other value, or one message
    that names what is wrong, never a generic "not valid JSON" for a valid document."""
    # orjson reads integers past 64 bits as floats (a 23-digit max_tokens would be "not an
    # integer"); a body with such a digit run takes the exact parser.
    if not _LONG_DIGITS.search(raw):
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            pass
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError(400, "request body is not UTF-8") from None
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise APIError(400, f"request body nests deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise APIError(400, "request body is not valid JSON") from None
    bad = _lone_surrogate_path(data)
    if bad is not None:
        raise APIError(400, f"{bad or 'body'}: a string holds a lone UTF-16 surrogate, which is not text")
    return data


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting outside strings (an upper bound is enough to refuse early)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _lone_surrogate_path(obj, path: str = "") -> str | None:
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        if isinstance(key, str) and _lone_surrogate_path(key) is not None:
            return path or "body"
        where = f"{path}.{key}" if isinstance(key, str) else f"{path}[{key}]"
        found = _lone_surrogate_path(value, where.lstrip("."))
        if found is not None:
            return found
    return None


@dataclass
class ServingContext:
    """`flywheel` (engine side of online training) and `trainer_state` (a callable returning the
    trainer's status snapshot) are optional: without them the server runs a fixed draft head.
    At most `max_running_requests + max_queued_requests` requests are in flight at once."""

    aengine: AsyncEngine
    metrics: Metrics
    served_model_name: str
    model_path: str
    api_key: str | None = None
    max_body_bytes: int = 8 << 20
    server_args: dict = field(default_factory=dict)
    flywheel: Any = None
    trainer_state: Callable[[], dict] | None = None
    max_queued_requests: int = 128
    created: int = field(default_factory=lambda: int(time.time()))
    _max_token_chars: int | None = field(default=None, repr=False)

    @property
    def engine(self):
        return self.aengine.engine

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def capacity(self) -> int:
        return self.engine.max_running + self.max_queued_requests

    # ---- validate ---------------------------------------------------------------------------
    async def parse(self, model_cls, request: Request):
        """JSON body -> model, whatever the Content-Type (curl -d sends form encoding)."""
        raw = await self.read_body(request)
        # A large body that needs the exact parser (or is not valid JSON) takes a while to read in
        # Python: not on the event loop.
        data = parse_json(raw) if len(raw) < PARSE_INLINE_BYTES else await asyncio.to_thread(parse_json, raw)
        if not isinstance(data, dict):
            raise APIError(400, "request body must be a JSON object")
        try:
            return model_cls.model_validate(data)
        except ValidationError as e:
            first = e.errors()[0]
            # Drop pydantic's union-member labels ("int", "list[str]") from the location.
            where = ".".join(
                str(p) for p in first.get("loc", ()) if not (isinstance(p, str) and (p in _TYPE_LABELS or "[" in p))
            )
            bad = first.get("input")
            if isinstance(bad, int) and not isinstance(bad, bool) and abs(bad) >= 2**63:  # a value error, not a type
                raise APIError(400, f"{where or 'body'}: {bad} is out of range") from None
            raise APIError(
                422, f"{where or 'body'}: {first.get('msg', 'invalid value')}", code="invalid_type"
            ) from None

    async def read_body(self, request: Request) -> bytes:
        """The body, refused past max_body_bytes while it arrives: a chunked upload has no
        Content-Length for the middleware to check."""
        chunks, size = [], 0
        stream = request.stream().__aiter__()
        while True:
            try:
                # A client that stops sending mid-body must not hold a connection forever.
                chunk = await asyncio.wait_for(stream.__anext__(), timeout=BODY_READ_TIMEOUT_S)
            except StopAsyncIteration:
                break
            except TimeoutError:
                raise APIError(408, f"request body not received within {BODY_READ_TIMEOUT_S:.0f} s") from None
            except ClientDisconnect:
                raise ClientGone("the client disconnected while sending its request") from None
            size += len(chunk)
            if size > self.max_body_bytes:
                raise APIError(413, f"request body larger than {self.max_body_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in (self.served_model_name, self.model_path):
            raise APIError(
                404,
                f"model '{name}' does not exist; this server serves '{self.served_model_name}'",
                "not_found_error",
                "model_not_found",
            )

    # ---- convert: tokenize off the event loop ------------------------------------------------
    def max_token_chars(self) -> int:
        """The longest token of the vocabulary, in characters: a text longer than this times the
        context length cannot fit, whatever it tokenizes to."""
        if self._max_token_chars is None:
            tok = self.tokenizer
            self._max_token_chars = max([len(tok.convert_tokens_to_string([t])) for t in tok.get_vocab()] + [1])
        return self._max_token_chars

    def check_text_length(self, text: str, field: str = "prompt") -> None:
        limit = self.engine.context_length * self.max_token_chars()
        if len(text) > limit:
            raise APIError(
                400,
                f"{field} has {len(text)} characters; this model's context length is {self.engine.context_length} "
                f"tokens (at most {limit} characters)",
                code="context_length_exceeded",
            )

    async def encode_all(self, prompts: list) -> list:
        """Text prompts as token ids, tokenized in a worker thread: a long prompt must not stall the
        event loop (health checks, other streams). Token-id prompts pass through."""
        for p in prompts:
            if isinstance(p, str):
                self.check_text_length(p)
        if not any(isinstance(p, str) for p in prompts):
            return prompts
        return await asyncio.to_thread(lambda: [self.engine.encode(p) if isinstance(p, str) else p for p in prompts])

    # ---- admit and submit -------------------------------------------------------------------
    def admit(self, n: int) -> None:
        """Refuse n new requests beyond the running slots plus the bounded queue. Runs on the event
        loop with no await before the submits that follow, so concurrent requests cannot both pass."""
        if n > self.capacity:
            raise APIError(400, f"{n} requests in one call exceed this server's capacity of {self.capacity}")
        if self.aengine.num_in_flight + n > self.capacity:
            self.metrics.rejected.inc(n)
            raise APIError(
                503,
                f"server is at capacity ({self.engine.max_running} running, "
                f"{self.max_queued_requests} queued); retry later",
                "service_unavailable",
                "server_overloaded",
            )

    def submit(self, prompt, params: SamplingParams, request_id: str | None = None):
        if params.max_new_tokens > self.engine.context_length:
            raise APIError(
                400,
                f"max_tokens is {params.max_new_tokens}; this model's context length is {self.engine.context_length}",
                code="context_length_exceeded",
            )
        try:
            return self.aengine.submit(prompt, params, request_id)
        except PromptTooLong as e:
            raise APIError(400, str(e), code="context_length_exceeded") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None

    async def compile_grammars(self, params) -> None:
        """Compile the requests' grammars off the event loop (xgrammar's one-time tokenizer analysis
        and a large schema's compile would stall every stream); `add_request` then finds them in
        the engine's cache. A grammar that does not compile is a 400."""
        specs = {p.grammar for p in params if p.grammar is not None}
        if not specs:
            return
        try:
            await asyncio.to_thread(lambda: [self.engine.grammars.compile(spec) for spec in specs])
        except ValueError as e:
            raise APIError(400, str(e)) from None

    def submit_all(self, pairs) -> list:
        """Submit (prompt, params[, request id]) tuples; if one is refused, abort the ones already queued."""
        pairs = list(pairs)
        self.admit(len(pairs))
        jobs = []
        try:
            for prompt, params, *request_id in pairs:
                jobs.append(self.submit(prompt, params, *request_id))
        except BaseException:
            for r, _ in jobs:
                self.aengine.abort(r)
            raise
        return jobs

    # ---- collect (blocking) or stream --------------------------------------------------------
    async def collect_all(self, request: Request, jobs) -> bool:
        """Wait for every job; False if the client went away. Any failure aborts them all."""
        try:
            await asyncio.gather(*(self.collect(request, r, q) for r, q in jobs))
            return True
        except ClientGone:
            return False
        finally:
            for r, _ in jobs:
                if not r.finished:
                    self.aengine.abort(r)

    async def collect(self, request: Request, req, queue) -> None:
        """Wait for a blocking request to finish; abort it if the client disconnects."""
        try:
            while True:
                try:
                    update = await asyncio.wait_for(queue.get(), timeout=POLL_DISCONNECT_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        raise ClientGone() from None
                    continue
                if update.finished:
                    break
        except (ClientGone, asyncio.CancelledError):
            self.aengine.abort(req)
            raise
        if req.finish_reason == "error":
            raise APIError(500, "the engine failed while running this request", "internal_error")

    async def text_updates(self, req, queue) -> AsyncIterator[tuple[str, bool]]:
        """(new text, finished) as tokens arrive; aborts the request if the consumer goes away."""
        async for text, done, _ in self.token_updates(req, queue):
            yield text, done

    async def token_updates(self, req, queue) -> AsyncIterator[tuple[str, bool, int]]:
        """(new text, finished, output tokens published so far): the count bounds what a stream
        may read of the request's per-token lists (logprobs) while the engine thread runs on."""
        sent = ""
        try:
            while True:
                update = await queue.get()
                if update.finished:
                    final = self.engine.output_text(req)
                    yield (final[len(sent) :] if final.startswith(sent) else ""), True, len(req.output_ids)
                    return
                text = self.tokenizer.decode(update.token_ids, skip_special_tokens=True)
                text = text[: len(text) - holdback(text, req.params.stop)]
                if len(text) > len(sent) and text.startswith(sent):
                    yield text[len(sent) :], False, len(update.token_ids)
                    sent = text
        finally:
            if not req.finished:
                self.aengine.abort(req)
