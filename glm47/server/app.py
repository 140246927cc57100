"""The FastAPI app: create_app(engine, tokenizer, config) wires the OpenAI and Anthropic routers, API-key
auth, the request-size limit, /health and /metrics, and one error format per API (an Anthropic path gets
Anthropic's error body, everything else OpenAI's). No traceback ever reaches a client. serve() runs it
with uvicorn; on SIGTERM uvicorn stops accepting, lets in-flight requests finish, then the engine stops."""

from __future__ import annotations

import contextlib
import hmac
import logging
import signal
import threading

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from glm47.chat import Tokenizer
from glm47.server import anthropic_api, openai_api
from glm47.server.context import ServerConfig, ServerContext
from glm47.server.protocol import ApiError

log = logging.getLogger("glm47.server")

# Error `type` per status: Anthropic's names (its SDK maps them back to exception classes); OpenAI's SDK
# only reads the status, so the same names serve both bodies.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
               429: "rate_limit_error", 500: "api_error", 503: "overloaded_error"}


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, e: ApiError) -> JSONResponse:
    kind = e.kind or ERROR_TYPES.get(e.status, "api_error")
    if is_anthropic(path):
        body = {"type": "error", "error": {"type": kind, "message": e.message}}
    else:
        body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status, headers=e.headers)


async def require_api_key(request: Request) -> None:
    """`x-api-key: KEY` (Anthropic SDK) or `Authorization: Bearer KEY` (OpenAI SDK, ANTHROPIC_AUTH_TOKEN)."""
    key = request.app.state.ctx.config.api_key
    if key is None:
        return
    given = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if given is None and auth[:7].lower() == "bearer ":
        given = auth[7:].strip()
    if given is None or not hmac.compare_digest(given.encode(), key.encode()):
        raise ApiError(401, "invalid or missing API key (send x-api-key or Authorization: Bearer)",
                       code="invalid_api_key")


class BodyLimit:
    """413 for a body over max_bytes: at once from Content-Length, else while a chunked body arrives."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"the request body is larger than the limit of {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await error_response(scope["path"], too_large)(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise too_large  # inside the handler's body read: the exception handlers answer
            return message

        await self.app(scope, limited_receive, send)


def create_app(engine, tokenizer: Tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """engine: an LLMEngine, or any object with its interface (tests pass a scripted one)."""
    ctx = ServerContext(engine, tokenizer, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        yield
        await ctx.engine.shutdown()

    app = FastAPI(title="glm47", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.ctx = ctx
    app.add_middleware(BodyLimit, max_bytes=ctx.config.max_request_bytes)
    auth = [Depends(require_api_key)]
    app.include_router(openai_api.router, dependencies=auth)
    app.include_router(anthropic_api.router, dependencies=auth)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(request.url.path, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return error_response(request.url.path, ApiError(e.status_code, str(e.detail), headers=e.headers))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, ApiError(400, str(e.errors()[0].get("msg", e))))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)  # the traceback goes to the log only
        return error_response(request.url.path, ApiError(500, f"internal server error ({type(e).__name__})"))

    @app.get("/health")
    async def health() -> Response:
        if ctx.engine.dead:
            return JSONResponse({"status": "error", "message": ctx.engine.dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root() -> dict:  # Claude Code probes HEAD /
        return {"name": "glm47", "models": ctx.config.served_model_names}

    return app


def serve(engine, tokenizer: Tokenizer, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", drain_timeout: float | None = 60.0) -> None:
    """Runs the server until SIGINT/SIGTERM; then in-flight requests get up to drain_timeout s to finish,
    and serve() returns (so `glm47 serve` exits 0)."""
    app = create_app(engine, tokenizer, config)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           timeout_graceful_shutdown=drain_timeout))
    with _stop_signals_return():
        server.run()


@contextlib.contextmanager
def _stop_signals_return():
    """uvicorn (>= 0.29) re-raises the signal that stopped it once it has drained, to the handler that was
    there before it ran: with the default one the process dies by SIGTERM (exit -15) or raises
    KeyboardInterrupt. A signal is how a server is meant to stop, so that re-raise lands on a no-op here."""
    if threading.current_thread() is not threading.main_thread():  # signals only reach the main thread
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
