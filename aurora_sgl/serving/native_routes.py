"""SGLang's native routes: /generate, model and server info, health, /flush_cache, and the
operator's views (/metrics for Prometheus, /aurora/stats for the online loop)."""

from __future__ import annotations

import asyncio
import dataclasses
import time

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from aurora_sgl import __version__
from aurora_sgl.engine.sampling import SamplingParams
from aurora_sgl.serving.context import RETRY_AFTER_S, OrjsonResponse, ServingContext, error_response, sse
from aurora_sgl.serving.logprobs import native_logprob_meta
from aurora_sgl.serving.protocol import APIError, NativeGenerateRequest, native_sampling_params

NATIVE_DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default for /generate
TRAINER_STALE_S = 60.0  # a trainer beats every step and every 0.25 s while idle; a step takes seconds


# ---- /generate: validate, convert, run ----------------------------------------------------------
def native_prompts(body: NativeGenerateRequest) -> tuple[list, bool]:
    """(prompts, whether the caller sent a batch)."""
    if (body.text is None) == (body.input_ids is None):
        raise APIError(400, "give exactly one of text or input_ids")
    ignored = body.unhonoured()
    if ignored:
        raise APIError(400, f"not supported by this server: {', '.join(ignored)}", code="unsupported_parameter")
    if body.text is not None:
        batch = isinstance(body.text, list)
        prompts = body.text if batch else [body.text]
    else:
        batch = bool(body.input_ids) and isinstance(body.input_ids[0], list)
        prompts = body.input_ids if batch else [body.input_ids]
    if not prompts:
        raise APIError(400, "empty batch")
    return prompts, batch


def native_rids(body: NativeGenerateRequest, n: int, batch: bool) -> list[str | None]:
    """SGLang's `rid`: the request id (meta_info "id"), one per prompt of a batch."""
    if body.rid is None:
        return [None] * n
    rids = body.rid if isinstance(body.rid, list) else [body.rid]
    if len(rids) != n or isinstance(body.rid, list) != batch:
        raise APIError(400, "rid must be one string per prompt (a list for a batch)")
    if len(set(rids)) != n or not all(rids):
        raise APIError(400, "rid values must be distinct, non-empty strings")
    return rids


def native_params(ctx: ServingContext, body: NativeGenerateRequest, n: int, batch: bool) -> list[SamplingParams]:
    sp = body.sampling_params
    sps = sp if isinstance(sp, list) else [sp] * n
    if len(sps) != n:
        raise APIError(400, "sampling_params list must match the batch size")
    default_max = min(NATIVE_DEFAULT_MAX_NEW_TOKENS, ctx.engine.context_length)
    out = []
    for s, opts in zip(sps, body.logprob_options(n, batch)):
        params = native_sampling_params(s, default_max)
        try:
            out.append(dataclasses.replace(params, **opts) if opts else params)
        except ValueError as e:
            raise APIError(400, str(e)) from None
    return out


def native_meta(req, tokenizer=None, with_text: bool = False, limit: int | None = None) -> dict:
    """meta_info of a /generate answer; with the logprobs when the request asked for them."""
    meta = req.meta_info()
    fr = meta.pop("finish_reason")
    stop = meta.pop("matched_stop")
    meta["finish_reason"] = (
        None
        if fr is None
        else ({"type": "length", "length": len(req.output_ids)} if fr == "length" else {"type": fr, "matched": stop})
    )
    if req.params.return_logprob:
        meta.update(native_logprob_meta(req, tokenizer, with_text, limit))
    return meta


async def stream_native(ctx: ServingContext, req, queue, with_text: bool = False):
    text = ""
    try:
        async for delta, done, count in ctx.token_updates(req, queue):
            text += delta
            if delta or done:
                meta = native_meta(req, ctx.tokenizer, with_text, count)
                yield sse({"text": text, "output_ids": list(req.output_ids[:count]), "meta_info": meta})
        yield b"data: [DONE]\n\n"
    finally:
        if not req.finished:
            ctx.aengine.abort(req)


# ---- info ----------------------------------------------------------------------------------------
def model_info(ctx: ServingContext) -> dict:
    return {
        "model_path": ctx.model_path,
        "tokenizer_path": ctx.model_path,
        "is_generation": True,
        "preferred_sampling_params": None,
        "served_model_name": ctx.served_model_name,
        "weight_version": str(ctx.engine.draft_version),
    }


def server_info(ctx: ServingContext) -> dict:
    engine, aengine = ctx.engine, ctx.aengine
    info = dict(ctx.server_args)
    info.update(
        version=__version__,
        served_model_name=ctx.served_model_name,
        model_path=ctx.model_path,
        backend="embedded",
        speculative_num_steps=engine.k,
        speculative_adaptive=engine.adaptive is not None,
        max_running_requests=engine.max_running,
        context_length=engine.context_length,
        num_running_requests=aengine.num_running,
        num_waiting_requests=aengine.num_waiting,
        num_in_flight_requests=aengine.num_in_flight,
        peak_in_flight_requests=aengine.peak_in_flight,
        draft_version=engine.draft_version,
        engine_healthy=aengine.last_error is None,
    )
    # SGLang's shape: its bench_serving reads internal_states[0].avg_spec_accept_length.
    info["internal_states"] = [
        {
            "avg_spec_accept_length": ctx.metrics.avg_spec_accept_length(),
            "speculative_num_steps": engine.k,
            "draft_version": engine.draft_version,
        }
    ]
    return info


def render_metrics(ctx: ServingContext) -> bytes:
    metrics, engine = ctx.metrics, ctx.engine
    metrics.running.set(ctx.aengine.num_running)
    metrics.waiting.set(ctx.aengine.num_waiting)
    metrics.draft_version.set(engine.draft_version)
    if engine.adaptive is not None:
        for k, n in enumerate(engine.adaptive.k_counts):
            metrics.k_steps.labels(k=str(k)).set(n)
    if ctx.flywheel is not None:
        fw = ctx.flywheel.stats()
        metrics.swaps.set(fw["swaps"])
        metrics.rollbacks.set(fw["rollbacks"])
        metrics.swap_pause.set(fw["last_swap_pause_s"])
        metrics.ring_drops.set(fw["ring_drops"])
    if ctx.trainer_state is not None:
        ts = ctx.trainer_state()
        now = time.time()
        metrics.train_steps.set(ts.get("train_steps") or 0)
        metrics.train_loss.set(ts.get("loss") or 0.0)
        metrics.trainer_alive.set(1 if ts.get("alive") else 0)
        metrics.trainer_restarts.set(ts.get("restarts") or 0)
        metrics.trainer_heartbeat_age.set(now - ts["heartbeat"] if ts.get("heartbeat") else float("nan"))
        metrics.trainer_last_step_age.set(now - ts["last_step_time"] if ts.get("last_step_time") else float("nan"))
        metrics.trainer_step_failures.set(ts.get("step_failures") or 0)
        metrics.trainer_positions_ratio.set(positions_ratio(ts))
        metrics.trainer_fresh_share.set(positions_ratio(ts, "fresh_positions"))
        metrics.trainer_publishes.set(ts.get("publishes") or 0)
        metrics.trainer_refused.set(ts.get("refused") or 0)
    return metrics.render()


def positions_ratio(trainer: dict, counter: str = "trained_positions") -> float:
    """Trained (or, with counter="fresh_positions", first-trained) positions per recorded position
    (NaN before anything was recorded)."""
    recorded = trainer.get("recorded_positions") or 0
    return (trainer.get(counter) or 0) / recorded if recorded else float("nan")


def training_health(trainer: dict | None, now: float) -> tuple[str, str | None]:
    """("off" | "starting" | "ok" | "degraded", why) from the trainer's state. Degraded: the trainer
    is down, the supervisor gave up on it, or it stopped beating; serving goes on with the last good
    weights either way."""
    if trainer is None:
        return "off", None
    if trainer.get("gave_up"):
        return "degraded", f"the trainer exited {trainer.get('restarts')} times; serving without training"
    if not trainer.get("alive"):
        return "degraded", f"the trainer is not running (restarts so far: {trainer.get('restarts')})"
    beat = trainer.get("heartbeat") or 0
    if not beat:
        return "starting", None
    if now - beat > TRAINER_STALE_S:
        return "degraded", f"no trainer heartbeat for {now - beat:.0f} s"
    return "ok", None


# ---- routes -------------------------------------------------------------------------------------
def register_native_routes(app: FastAPI, ctx: ServingContext) -> None:
    @app.post("/generate")
    async def generate(request: Request):
        body = await ctx.parse(NativeGenerateRequest, request)
        prompts, batch = native_prompts(body)
        params = native_params(ctx, body, len(prompts), batch)
        if body.stream and len(prompts) > 1:
            raise APIError(400, "streaming supports one prompt per request")
        prompts = await ctx.encode_all(prompts)
        await ctx.compile_grammars(params)
        jobs = ctx.submit_all(zip(prompts, params, native_rids(body, len(prompts), batch)))
        if body.stream:
            return StreamingResponse(
                stream_native(ctx, *jobs[0], body.return_text_in_logprobs), media_type="text/event-stream"
            )
        if not await ctx.collect_all(request, jobs):
            return Response(status_code=499)
        out = [
            {
                "text": ctx.engine.output_text(r),
                "output_ids": list(r.output_ids),
                "meta_info": native_meta(r, ctx.tokenizer, body.return_text_in_logprobs),
            }
            for r, _ in jobs
        ]
        return out if batch else out[0]

    for path in ("/get_model_info", "/model_info"):
        app.get(path)(lambda: model_info(ctx))
    for path in ("/server_info", "/get_server_info"):
        app.get(path)(lambda: server_info(ctx))

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        """200 while the server serves. The body says whether online training is healthy: a
        degraded trainer never takes the server out of a load balancer's rotation."""
        training, why = training_health(ctx.trainer_state() if ctx.trainer_state else None, time.time())
        body = {"status": "degraded" if training == "degraded" else "ok", "training": training}
        if why:
            body["reason"] = why
        return OrjsonResponse(body, headers={"X-Aurora-Training": training})

    @app.get("/health_generate")
    async def health_generate(request: Request):
        ctx.admit(1)
        req, queue = ctx.submit([ctx.tokenizer.bos_token_id or 0], SamplingParams(max_new_tokens=1, ignore_eos=True))
        try:
            await asyncio.wait_for(ctx.collect(request, req, queue), timeout=30)
        except (TimeoutError, APIError):
            ctx.aengine.abort(req)
            return error_response(
                503,
                "engine did not produce a token",
                "service_unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        return Response(status_code=200)

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache():
        # The embedded engine keeps no cross-request prefix cache: nothing to flush.
        return PlainTextResponse("Cache flushed.\n")

    @app.get("/metrics")
    async def prometheus():
        return Response(render_metrics(ctx), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/aurora/stats")
    async def aurora_stats():
        return {
            "draft_version": ctx.engine.draft_version,
            "speculative_num_steps": ctx.engine.k,
            "adaptive": ctx.engine.adaptive.stats() if ctx.engine.adaptive is not None else None,
            "accept_length": ctx.metrics.stats(),
            "flywheel": ctx.flywheel.stats() if ctx.flywheel is not None else None,
            "trainer": dict(ctx.trainer_state(), online=True) if ctx.trainer_state else {"online": False},
        }
