"""Anthropic-compatible endpoints for Claude Code: POST /v1/messages (?beta=true tolerated) and
/v1/messages/count_tokens. Streams use `event:` lines (the SDK dispatches on them): message_start, ping,
content_block_start / delta / stop per thinking, text and tool_use block (a thinking block ends with its
signature_delta), message_delta with stop_reason and usage, message_stop. Thinking signatures are random:
nothing checks them, here or in any non-Anthropic backend."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glm47.parsers import Delta
from glm47.server.anthropic_protocol import CountTokensRequest, MessagesRequest, sampling_params, to_chat
from glm47.server.async_engine import GenerationError, RequestHandle
from glm47.server.context import ServerContext, new_id
from glm47.server.protocol import body_schema, parse_body
from glm47.server.streaming import (ChoiceState, abort_on_disconnect, block_events, parsed_reply, sse,
                                    sse_response)

router = APIRouter()
PING = sse({"type": "ping"}, "ping")


@router.post("/v1/messages/count_tokens", openapi_extra=body_schema(CountTokensRequest))
async def count_tokens(request: Request) -> dict:
    """Claude Code calls this every turn to manage its context window: render the prompt, count it."""
    ctx: ServerContext = request.app.state.ctx
    req: CountTokensRequest = parse_body(await request.body(), CountTokensRequest)
    ctx.model_name(req.model)
    messages, tools, enable_thinking = to_chat(req)
    prompt = await ctx.render_chat(messages, tools, enable_thinking, req.clear_thinking(ctx.config.clear_thinking))
    return {"input_tokens": len(prompt)}


@router.post("/v1/messages", openapi_extra=body_schema(MessagesRequest))
async def create_message(request: Request):
    ctx: ServerContext = request.app.state.ctx
    req: MessagesRequest = parse_body(await request.body(), MessagesRequest)
    model = ctx.model_name(req.model)
    req.check_output_config()
    messages, tools, enable_thinking = to_chat(req)
    params = sampling_params(req)
    prompt = await ctx.render_chat(messages, tools, enable_thinking, req.clear_thinking(ctx.config.clear_thinking))
    ctx.check_context(len(prompt), req.max_tokens)
    handle = await ctx.submit("msg", [(prompt, params)])
    reply = MessageReply(ctx, handle, model, ChoiceState(tools, enable_thinking, _tool_use_id))
    if req.stream:
        return sse_response(reply.stream())
    async with abort_on_disconnect(request, handle):
        return JSONResponse(await reply.whole())


def _tool_use_id(index: int) -> str:
    return "toolu_" + uuid.uuid4().hex[:24]


def _signature() -> str:
    return uuid.uuid4().hex


class MessageReply:
    def __init__(self, ctx: ServerContext, handle: RequestHandle, model: str, state: ChoiceState):
        self.ctx, self.handle, self.model, self.st = ctx, handle, model, state
        self.id = new_id("msg_")

    async def whole(self) -> dict:
        parsed, reason = await parsed_reply(self.handle, self.st, self.ctx.config.keepalive_seconds)
        content = []
        if parsed.reasoning_content is not None:
            content.append({"type": "thinking", "thinking": parsed.reasoning_content, "signature": _signature()})
        if parsed.content is not None:
            content.append({"type": "text", "text": parsed.content})
        for call in parsed.tool_calls:
            content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": json.loads(call.arguments)})
        stop_reason, stop_sequence = self._stop(reason)
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": self.usage()}

    async def stream(self) -> AsyncIterator[str]:
        prompt = self.handle.num_prompt_tokens[0]
        blocks = _Blocks()
        try:
            yield sse({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": [],
                "stop_reason": None, "stop_sequence": None,
                "usage": {"input_tokens": prompt, "output_tokens": 0, "cache_creation_input_tokens": 0,
                          "cache_read_input_tokens": 0}}}, "message_start")
            yield PING
            async for event in block_events(self.handle, self.st, self.ctx.config.keepalive_seconds, blocks, PING):
                yield event
            stop_reason, stop_sequence = self._stop(self.st.stream_finish_reason)
            yield sse({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
                       "usage": self.usage()}, "message_delta")
            yield sse({"type": "message_stop"}, "message_stop")
        except GenerationError as e:  # the SDK raises on an `error` event
            yield sse({"type": "error", "error": {"type": "api_error", "message": str(e)}}, "error")
        finally:
            self.handle.abort()  # client gone (Starlette cancels us) or error: free the KV blocks

    def _stop(self, reason: str | None) -> tuple[str, str | None]:
        if reason == "tool_calls":
            return "tool_use", None
        if reason == "length":
            return "max_tokens", None
        if self.st.out.stop_string is not None:
            return "stop_sequence", self.st.out.stop_string
        return "end_turn", None

    def usage(self) -> dict:
        """Prefix-cache hits are Anthropic's cache reads; input_tokens counts only the rest."""
        cached = self.st.out.num_cached_tokens
        return {"input_tokens": self.handle.num_prompt_tokens[0] - cached, "output_tokens": len(self.st.out.token_ids),
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}


class _Blocks:
    """Turns parsed deltas into content-block events: one block open at a time, indices 0, 1, 2, ..."""

    def __init__(self):
        self.index = -1
        self.kind: str | None = None  # 'thinking' | 'text' | 'tool_use' while a block is open

    def add(self, d: Delta) -> list[str]:
        if d.reasoning_content is not None:
            return self._ensure("thinking", {"type": "thinking", "thinking": "", "signature": ""}) + [
                self._delta({"type": "thinking_delta", "thinking": d.reasoning_content})]
        if d.content is not None:
            return self._ensure("text", {"type": "text", "text": ""}) + [
                self._delta({"type": "text_delta", "text": d.content})]
        events = []
        for call in d.tool_calls:
            if call.id is not None:  # a new call: a new block; its whole input follows as one input_json_delta
                events += self.close() + self._open("tool_use", {"type": "tool_use", "id": call.id,
                                                                 "name": call.name, "input": {}})
            events.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        return events

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        events = []
        if self.kind == "thinking":  # the SDK sets the signature from this one event, just before the stop
            events.append(self._delta({"type": "signature_delta", "signature": _signature()}))
        events.append(sse({"type": "content_block_stop", "index": self.index}, "content_block_stop"))
        self.kind = None
        return events

    def _ensure(self, kind: str, block: dict) -> list[str]:
        return [] if self.kind == kind else self.close() + self._open(kind, block)

    def _open(self, kind: str, block: dict) -> list[str]:
        self.index += 1
        self.kind = kind
        return [sse({"type": "content_block_start", "index": self.index, "content_block": block},
                    "content_block_start")]

    def _delta(self, delta: dict) -> str:
        return sse({"type": "content_block_delta", "index": self.index, "delta": delta}, "content_block_delta")
