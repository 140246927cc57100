"""The web chat page at / (glm47/server/web/index.html: one file, no build step, no CDN) and the two routes it
needs besides the OpenAI API: the built-in tools' definitions and running one of them (glm47/tools: a
calculator, unit conversion, a weather table and dates; pure functions, safe to run for any caller)."""

from __future__ import annotations

import json
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from glm47.server.protocol import Body, bad_request, body_schema, parse_body
from glm47.tools import TOOLS, run_tool

page = APIRouter()  # no API key: the page itself asks for it
router = APIRouter()


class RunToolRequest(Body):
    name: str
    arguments: str | dict = "{}"


@page.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # Claude Code probes HEAD /
async def chat_page() -> HTMLResponse:
    return HTMLResponse(resources.files("glm47.server").joinpath("web/index.html").read_text(encoding="utf-8"))


@router.get("/web/tools")
async def tool_list() -> list[dict]:
    return TOOLS


@router.post("/web/tools/run", openapi_extra=body_schema(RunToolRequest))
async def tool_run(request: Request) -> dict:
    req: RunToolRequest = parse_body(await request.body(), RunToolRequest)
    if len(json.dumps(req.arguments)) > 10_000:
        raise bad_request("arguments are longer than 10,000 characters", "arguments")
    return {"result": run_tool(req.name, req.arguments)}
