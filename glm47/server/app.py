"""The FastAPI app: create_app(engine, tokenizer, config) wires the OpenAI, Anthropic and Responses routers, the web
chat, API-key auth, the request guards (glm47/server/http.py: body size and deadline, JSON-only and Host checks without
a key), /health, /metrics and /openapi.json, and one error format per API (an Anthropic path gets Anthropic's error
body, everything else OpenAI's). No traceback ever reaches a client. serve() runs it with uvicorn (a header deadline and
a connection cap on top of uvicorn's h11); on SIGTERM uvicorn stops accepting, lets in-flight requests finish, then the
engine stops. An engine that fails stops the server: serve() returns 1, for a supervisor to restart it."""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import signal
import threading
from dataclasses import replace

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from glm47.chat import Tokenizer
from glm47.sampling_params import ContextTooLong
from glm47.server import anthropic_api, anthropic_protocol, openai_api, protocol, responses_api, web
from glm47.server.async_engine import GenerationError
from glm47.server.context import ServerConfig, ServerContext
from glm47.server.http import LOOPBACK_HOSTS, Guard, guarded_h11, raise_open_files_limit
from glm47.server.protocol import ApiError

log = logging.getLogger("glm47.server")

# Error `type` per status: Anthropic's names (its SDK maps them back to exception classes); OpenAI's SDK
# only reads the status, so the same names serve both bodies.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error", 500: "api_error",
               503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic(path: str) -> bool:
    return path.startswith("/v1/messages")


def error_response(path: str, e: ApiError) -> JSONResponse:
    status = e.status
    if is_anthropic(path) and e.code == "overloaded":
        status = 529  # Anthropic's "overloaded", which its SDK and Claude Code retry after Retry-After
    kind = e.kind or ERROR_TYPES.get(status, "api_error")
    if is_anthropic(path):
        body = {"type": "error", "error": {"type": kind, "message": e.message}}
    else:
        body = {"error": {"message": e.message, "type": kind, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=status, headers=e.headers)


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


def create_app(engine, tokenizer: Tokenizer, config: ServerConfig | None = None) -> FastAPI:
    """engine: an LLMEngine, or any object with its interface (tests pass a scripted one)."""
    ctx = ServerContext(engine, tokenizer, config or ServerConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx.engine.start()
        yield
        await ctx.engine.shutdown()

    app = FastAPI(title="glm47", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.ctx = ctx
    cfg = ctx.config
    app.add_middleware(Guard, max_bytes=cfg.max_request_bytes, body_timeout=cfg.body_timeout_seconds,
                       require_json=cfg.api_key is None, allowed_hosts=cfg.allowed_hosts,
                       error_response=error_response)
    auth = [Depends(require_api_key)]
    app.include_router(openai_api.router, dependencies=auth)
    app.include_router(anthropic_api.router, dependencies=auth)
    app.include_router(responses_api.router, dependencies=auth)
    app.include_router(web.router, dependencies=auth)
    app.include_router(web.page)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError) -> JSONResponse:
        return error_response(request.url.path, e)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:  # unknown route, wrong method
        message = str(e.detail)
        if e.status_code == 404:
            routes = sorted(f"{m.upper()} {path}" for path, ops in app.openapi()["paths"].items() for m in ops)
            message = f"no route {request.method} {request.url.path}; this server serves: {', '.join(routes)}"
        return error_response(request.url.path, ApiError(e.status_code, message, headers=e.headers))

    @app.exception_handler(GenerationError)
    async def generation_error(request: Request, e: GenerationError) -> JSONResponse:
        return error_response(request.url.path, ApiError(e.status, str(e), code=e.code))

    @app.exception_handler(ContextTooLong)
    async def context_too_long(request: Request, e: ContextTooLong) -> JSONResponse:
        path = request.url.path
        words = anthropic_protocol.context_error if is_anthropic(path) else protocol.context_error
        return error_response(path, words(e))

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, e: ClientDisconnect) -> Response:
        return Response(status_code=400)  # nobody reads it; the guard logged the hang-up in one line

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(request.url.path, ApiError(400, str(e.errors()[0].get("msg", e))))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)  # the traceback goes to the log only
        return error_response(request.url.path, ApiError(500, f"internal server error ({type(e).__name__})"))

    @app.get("/health")
    async def health() -> Response:
        if ctx.engine.dead:  # the reason is in the log, not here
            message = "the engine failed" if ctx.engine.failed else "the server is shutting down"
            return JSONResponse({"status": "error", "message": message}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=ctx.metrics.content_type)

    return app


def uvicorn_config(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info",
                   drain_timeout: float | None = 60.0) -> uvicorn.Config:
    """uvicorn's settings for the app: h11 with a header deadline and a connection cap, uvicorn's idle
    keep-alive timeout, and the graceful-shutdown drain time."""
    cfg: ServerConfig = app.state.ctx.config
    return uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout,
                          http=guarded_h11(cfg.header_timeout_seconds, cfg.max_connections),
                          timeout_keep_alive=cfg.idle_timeout_seconds)


def serve(engine, tokenizer: Tokenizer, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info", drain_timeout: float | None = 60.0) -> int:
    """Runs the server until SIGINT/SIGTERM; then in-flight requests get up to drain_timeout s to finish, and
    serve() returns 0 (so `glm47 serve` exits 0). If the engine fails, the server stops the same way and
    serve() returns 1: a supervisor (systemd, Kubernetes, docker --restart) starts a fresh one."""
    if config.api_key is None:
        log.warning("no API key (--api-key / GLM47_API_KEY): anyone who can reach %s:%d can use this server; "
                    "it accepts only JSON bodies%s", host, port,
                    " addressed to localhost" if _is_loopback(host) else "")
        if _is_loopback(host) and config.allowed_hosts is None:  # a DNS-rebinding page cannot name localhost
            config = replace(config, allowed_hosts=LOOPBACK_HOSTS)
    raise_open_files_limit()
    app = create_app(engine, tokenizer, config)
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level, drain_timeout))
    async_engine = app.state.ctx.engine

    def stop() -> None:  # on the engine thread; uvicorn polls should_exit
        server.should_exit = True

    async_engine.on_failure = stop
    with _stop_signals_return():
        server.run()
    if async_engine.failed:
        log.error("the engine failed (the traceback is above); exiting with status 1")
        return 1
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
