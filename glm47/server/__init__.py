"""The HTTP server: OpenAI- and Anthropic-compatible APIs over one engine thread (`glm47 serve`).
create_app(engine, tokenizer, config) builds the FastAPI app; serve(...) runs it with uvicorn. Imports are
lazy so that `glm47.server.client`, a thin stdlib client, loads without FastAPI or torch."""

from __future__ import annotations

__all__ = ["ServerConfig", "create_app", "serve"]


def __getattr__(name: str):
    if name in ("create_app", "serve"):
        from glm47.server import app

        return getattr(app, name)
    if name == "ServerConfig":
        from glm47.server.context import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'glm47.server' has no attribute {name!r}")
