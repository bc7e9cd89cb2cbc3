"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

Each route has the shape of SGLang's `serving_base`: validate the body, convert it into engine
requests (prompts and `SamplingParams`), then answer blocking or as a server-sent-event stream.
"""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from aurora_sgl.serving.context import ServingContext, finish_reason, sse, usage
from aurora_sgl.serving.logprobs import chat_logprobs, completion_logprobs
from aurora_sgl.serving.protocol import MAX_N, APIError, ChatCompletionRequest, CompletionRequest, error_body

OPENAI_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


# ---- convert ----------------------------------------------------------------------------------
def completion_prompts(body: CompletionRequest) -> list:
    p = body.prompt
    if isinstance(p, str):
        return [p]
    if not p:
        raise APIError(400, "prompt must not be empty")
    if isinstance(p[0], int):
        return [list(p)]
    return list(p)


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    """Messages with their content as one string (text parts joined). Any other kind of part, and
    any message field besides role and content, is refused by name: dropping an image or a tool
    call silently would answer a different question."""
    messages = []
    for i, m in enumerate(body.messages):
        unhonoured = sorted(name for name, value in (m.model_extra or {}).items() if value is not None)
        if unhonoured:
            fields = ", ".join(f"messages[{i}].{name}" for name in unhonoured)
            raise APIError(400, f"not supported by this server: {fields}", code="unsupported_parameter")
        if isinstance(m.content, str):
            content = m.content
        else:
            texts = []
            for j, part in enumerate(m.content):
                where = f"messages[{i}].content[{j}]"
                if part.get("type") != "text":
                    kind = f"of type {part['type']!r}" if "type" in part else "without a type"
                    raise APIError(400, f"{where}: content part {kind} is not supported (text parts only)")
                if not isinstance(part.get("text"), str):
                    raise APIError(400, f"{where}: a text content part needs a string 'text'")
                texts.append(part["text"])
            content = "".join(texts)
        messages.append({"role": m.role, "content": content})
    return messages


def chat_prompt_ids(ctx: ServingContext, body: ChatCompletionRequest) -> list[int]:
    """The chat-templated prompt as token ids (called in a worker thread)."""
    messages = chat_messages(body)
    for i, m in enumerate(messages):
        ctx.check_text_length(m["content"], f"messages[{i}].content")
    try:
        text = ctx.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as e:  # template errors are the caller's input problem
        raise APIError(400, f"chat template failed: {e}") from None
    return ctx.engine.encode(text)


# ---- run: blocking or streaming ----------------------------------------------------------------
async def run_openai(
    ctx: ServingContext,
    request: Request,
    body,
    prompts: list,
    kind: str,
    default_max: int,
    echo_texts: list[str] | None = None,
):
    """`prompts` are token ids (the caller validated the body and tokenized off the event loop).
    `echo_texts`: completions with echo, the prompt texts each choice's text starts with."""
    params = [body.sampling_params(default_max, j) for j in range(body.n)]
    await ctx.compile_grammars(params)
    jobs = ctx.submit_all((p, sp) for p in prompts for sp in params)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
    echoes = [echo_texts[i // body.n] for i in range(len(jobs))] if echo_texts is not None else None
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_openai(ctx, jobs, rid, kind, include_usage, body.n, echoes), media_type="text/event-stream"
        )
    if not await ctx.collect_all(request, jobs):
        return Response(status_code=499)
    choices = []
    for i, (r, _) in enumerate(jobs):
        text = ctx.engine.output_text(r)
        lp = r.params.return_logprob
        if kind == "chat":
            choices.append(
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason(r),
                    "logprobs": chat_logprobs(r, ctx.tokenizer) if lp else None,
                }
            )
        else:
            echo = echoes[i] if echoes is not None else None
            logprobs = None
            if lp:
                logprobs = completion_logprobs(r, ctx.tokenizer, echo is not None)
            text = (echo or "") + text
            choices.append({"index": i, "text": text, "finish_reason": finish_reason(r), "logprobs": logprobs})
    return {
        "id": rid,
        "object": "chat.completion" if kind == "chat" else "text_completion",
        "created": int(time.time()),
        "model": ctx.served_model_name,
        "choices": choices,
        "usage": usage([r for r, _ in jobs], body.n),
    }


async def stream_openai(
    ctx: ServingContext, jobs, rid: str, kind: str, include_usage: bool, n: int = 1, echoes: list[str] | None = None
):
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
    now = int(time.time())
    lp_sent = [0] * len(jobs)  # output positions whose logprobs went out, per choice
    text_sent = [0] * len(jobs)  # characters of text, per choice (completions' text_offset)
    echo_sent = [echoes is None] * len(jobs)  # the prompt's logprobs went out (echo), per choice

    def logprobs(i, req, count):
        """The logprobs of choice i's positions not sent yet, up to `count` (None: not asked)."""
        if not req.params.return_logprob or count is None:
            return None
        start, lp_sent[i] = lp_sent[i], max(lp_sent[i], count)
        if kind == "chat":
            return chat_logprobs(req, ctx.tokenizer, start, count)
        echo, echo_sent[i] = not echo_sent[i], True
        return completion_logprobs(req, ctx.tokenizer, echo, start, count, 0 if echo else text_sent[i])

    def chunk(i, text=None, reason=None, role=False, req=None, count=None):
        lp = logprobs(i, req, count) if req is not None else None
        if kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text is not None else {})
            c = {"index": i, "delta": delta, "finish_reason": reason, "logprobs": lp}
        else:
            c = {"index": i, "text": text or "", "finish_reason": reason, "logprobs": lp}
            text_sent[i] += len(text or "")
        return sse({"id": rid, "object": obj, "created": now, "model": ctx.served_model_name, "choices": [c]})

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i, req, queue):
        try:
            async for text, done, count in ctx.token_updates(req, queue):
                await merged.put((i, text, done, req, count))
        except Exception:  # never leave the response waiting for a choice that cannot finish
            req.finish_reason = "error"
            await merged.put((i, "", True, req, None))

    tasks = [asyncio.create_task(pump(i, r, q)) for i, (r, q) in enumerate(jobs)]
    try:
        if kind == "chat":
            for i in range(len(jobs)):
                yield chunk(i, role=True)
        elif echoes is not None:  # the prompt first; its logprobs (prefill's) with the next chunk
            for i in range(len(jobs)):
                yield chunk(i, echoes[i])
        remaining = len(jobs)
        while remaining:
            i, text, done, req, count = await merged.get()
            if text:
                yield chunk(i, text, req=req, count=count)
            if done:
                remaining -= 1
                if req.finish_reason == "error":
                    yield sse(error_body(500, "the engine failed while running this request", "internal_error"))
                pending = req if count is not None and (count > lp_sent[i] or not echo_sent[i]) else None
                yield chunk(i, None if kind == "chat" else "", finish_reason(req), req=pending, count=count)
        if include_usage:
            yield sse(
                {
                    "id": rid,
                    "object": obj,
                    "created": now,
                    "model": ctx.served_model_name,
                    "choices": [],
                    "usage": usage([r for r, _ in jobs], n),
                }
            )
        yield b"data: [DONE]\n\n"
    finally:
        for t in tasks:
            t.cancel()
        for r, _ in jobs:
            if not r.finished:
                ctx.aengine.abort(r)


# ---- routes -------------------------------------------------------------------------------------
def model_card(ctx: ServingContext) -> dict:
    return {
        "id": ctx.served_model_name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "aurora_sgl",
        "root": ctx.model_path,
        "max_model_len": ctx.engine.context_length,
    }


def validate(ctx: ServingContext, body) -> None:
    """What a body can be refused for before anything is tokenized."""
    ctx.check_model(body.model)
    ignored = body.unhonoured()
    if ignored:
        raise APIError(400, f"not supported by this server: {', '.join(ignored)}", code="unsupported_parameter")
    if body.stream_options is not None and not body.stream:
        raise APIError(400, "stream_options is only allowed with stream=true")
    if not 1 <= body.n <= MAX_N:  # n = 0 would otherwise answer 200 with no choices
        raise APIError(400, f"n must be between 1 and {MAX_N}, got {body.n}")


def register_openai_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(ctx)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        ctx.check_model(model_id)
        return model_card(ctx)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await ctx.parse(CompletionRequest, request)
        validate(ctx, body)
        if body.suffix:
            raise APIError(400, "suffix is not supported", code="unsupported_parameter")
        body.logprob_options()  # refuse bad values before tokenizing
        raw = completion_prompts(body)
        prompts = await ctx.encode_all(raw)
        echo_texts = None
        if body.echo:
            # SGLang's echo: a text prompt as sent, a token-id prompt decoded without its special
            # tokens (the BOS a client adds does not show in the text).
            echo_texts = [p if isinstance(p, str) else ctx.tokenizer.decode(p, skip_special_tokens=True) for p in raw]
        return await run_openai(
            ctx, request, body, prompts, "completion", OPENAI_DEFAULT_MAX_TOKENS, echo_texts=echo_texts
        )

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await ctx.parse(ChatCompletionRequest, request)
        validate(ctx, body)
        body.logprob_options()  # refuse bad values before tokenizing
        if body.max_completion_tokens is not None and body.max_tokens is None:
            body.max_tokens = body.max_completion_tokens
        prompt = await asyncio.to_thread(chat_prompt_ids, ctx, body)
        default_max = max(1, ctx.engine.context_length - len(prompt))
        return await run_openai(ctx, request, body, [prompt], "chat", default_max)
