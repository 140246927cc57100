"""Streaming plumbing shared by the OpenAI, Anthropic and Responses endpoints: SSE framing, iterating a request's
outputs with keep-alive ticks, aborting on client disconnect, and ChoiceState, which parses one choice's
text into reasoning / content / tool-call deltas as it streams (glm47/parsers) and adds up its output
(glm47/text's CompletionOutput) for the final answer and the usage. The wire shapes of each API live in
openai_api.py, anthropic_api.py and responses_api.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from glm47.parsers import Delta, OutputStream, ParsedOutput, parse_output
from glm47.server.async_engine import RequestHandle
from glm47.text import CompletionOutput, TextDelta, chat_finish_reason

DONE = "data: [DONE]\n\n"
KEEPALIVE = ": keep-alive\n\n"  # an SSE comment: clients ignore it, proxies see the connection is alive
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no buffering in nginx & co.


def sse(data: dict, event: str | None = None) -> str:
    """One SSE message; Anthropic's SDK needs the `event:` line, OpenAI's reads only `data:`."""
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def outputs(handle: RequestHandle, keepalive: float) -> AsyncIterator[TextDelta | None]:
    """The request's outputs until every sample finished, with a None at least every `keepalive` seconds
    (during a long prefill, or while a tool call is held back until it closes), so the stream can send a
    keep-alive and notice a client that left."""
    tick = time.monotonic() + keepalive
    while True:
        try:
            out = await handle.next(max(0.0, tick - time.monotonic()))
        except TimeoutError:
            out = False
        if out is None:
            return
        if out is not False:
            yield out
        if out is False or time.monotonic() >= tick:
            yield None
            tick = time.monotonic() + keepalive


async def block_events(handle: RequestHandle, state: ChoiceState, keepalive: float, blocks, tick: str
                       ) -> AsyncIterator[str]:
    """A one-choice stream's events: each output's parsed deltas through `blocks` (add(delta) and close(),
    each returning events), `tick` whenever outputs() ticks, and the events that close the last block."""
    async for out in outputs(handle, keepalive):
        if out is None:
            yield tick
            continue
        for delta in state.feed(out):
            for event in blocks.add(delta):
                yield event
    for event in blocks.close():
        yield event


async def parsed_reply(handle: RequestHandle, state: ChoiceState, keepalive: float) -> tuple[ParsedOutput, str | None]:
    """A one-choice request's whole reply: every output fed to `state`, then parsed (see ChoiceState.parsed)."""
    async for out in outputs(handle, keepalive):
        if out is not None:
            state.feed(out)
    return state.parsed()


@contextlib.asynccontextmanager
async def abort_on_disconnect(request: Request, handle: RequestHandle):
    """For non-streaming answers: a client that hangs up stops its request (streams get this from
    Starlette, which cancels the response when the client goes). Leaving the block aborts what is left."""
    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        handle.abort()

    task = asyncio.create_task(watch())
    try:
        yield
    finally:
        task.cancel()
        handle.abort()


class ChoiceState:
    """One choice of a chat reply. feed() each TextDelta; it returns the parsed deltas to stream."""

    def __init__(self, tools: list[dict] | None, thinking: bool, call_id: Callable[[int], str] | None = None):
        self.tools, self.thinking, self.call_id = tools, thinking, call_id
        self.parser = OutputStream(tools, thinking=thinking, call_id=call_id)
        self.out = CompletionOutput(0)  # the choice's text, tokens, logprobs and engine finish reason so far

    @property
    def finished(self) -> bool:
        return self.out.finished

    def feed(self, d: TextDelta) -> list[Delta]:
        self.out.add(d)
        deltas = self.parser.feed(d.text) if d.text else []
        if d.finish_reason is not None:
            deltas += self.parser.close()
        return deltas

    @property
    def stream_finish_reason(self) -> str | None:
        """The finish reason of the streamed reply (complete calls are the ones the stream sent)."""
        return chat_finish_reason(self.out.finish_reason, self.parser.num_tool_calls)

    def parsed(self) -> tuple[ParsedOutput, str | None]:
        """The whole reply parsed at once (a cut-off call is content) and its finish reason."""
        out = parse_output(self.out.text, self.tools, thinking=self.thinking, call_id=self.call_id)
        return out, chat_finish_reason(self.out.finish_reason, len(out.tool_calls))

    def reasoning_tokens(self, think_end_id: int) -> int:
        """Tokens up to and including </think> (all of them if it never came), when the reply began thinking."""
        if not self.thinking:
            return 0
        ids = self.out.token_ids
        return ids.index(think_end_id) + 1 if think_end_id in ids else len(ids)
