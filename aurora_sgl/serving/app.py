"""The HTTP app on the embedded engine: middleware, error handlers, and the two route families
(`openai_routes`, `native_routes`) over one `ServingContext`."""

from __future__ import annotations

import hmac
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from aurora_sgl import __version__
from aurora_sgl.serving.async_engine import AsyncEngine
from aurora_sgl.serving.context import RETRY_AFTER_S, ClientGone, OrjsonResponse, ServingContext, error_response
from aurora_sgl.serving.metrics import Metrics
from aurora_sgl.serving.native_routes import register_native_routes
from aurora_sgl.serving.openai_routes import register_openai_routes
from aurora_sgl.serving.protocol import APIError

log = logging.getLogger("aurora_sgl.http")


def create_app(
    aengine: AsyncEngine,
    metrics: Metrics,
    *,
    served_model_name: str,
    model_path: str,
    api_key: str | None = None,
    max_body_bytes: int = 8 << 20,
    server_args: dict | None = None,
    flywheel=None,
    trainer_state=None,
    max_queued_requests: int = 128,
) -> FastAPI:
    """See `ServingContext` for the arguments."""
    ctx = ServingContext(
        aengine,
        metrics,
        served_model_name,
        model_path,
        api_key=api_key,
        max_body_bytes=max_body_bytes,
        server_args=dict(server_args or {}),
        flywheel=flywheel,
        trainer_state=trainer_state,
        max_queued_requests=max_queued_requests,
    )
    ctx.max_token_chars()  # one pass over the vocabulary at startup, not on the first request's event loop
    app = FastAPI(title="aurora_sgl", version=__version__, default_response_class=OrjsonResponse)

    # ---- middleware and error handlers ------------------------------------------------------
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_key and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            # The scheme is case-insensitive (RFC 9110); the key is compared in constant time.
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
                return error_response(401, "missing or invalid API key", "authentication_error", "invalid_api_key")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return error_response(413, f"request body larger than {max_body_bytes} bytes")
        return await call_next(request)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        headers = {"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None
        return error_response(e.status, e.message, e.type, e.code, headers)

    @app.exception_handler(ClientGone)
    async def client_gone(request: Request, e: ClientGone):
        # Nobody reads this answer; one line, not a traceback per abandoned upload.
        log.info("%s %s: %s", request.method, request.url.path, e)
        return Response(status_code=499)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        errs = e.errors()
        if any(err.get("type") == "json_invalid" for err in errs):
            return error_response(400, "request body is not valid JSON")
        first = errs[0] if errs else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return error_response(422, f"{where or 'body'}: {first.get('msg', 'invalid value')}", code="invalid_type")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return error_response(
            e.status_code, str(e.detail), "not_found_error" if e.status_code == 404 else "invalid_request_error"
        )

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}", "internal_error")

    register_openai_routes(app, ctx)
    register_native_routes(app, ctx)
    app.state.ctx = ctx
    return app
