"""The agent loop: ask the model, run the built-in tools it calls, feed their results back, and repeat until
it answers without a tool call (or max_rounds model calls have been made). Each assistant turn keeps its
reasoning, so the model sees its own earlier thoughts in the same user turn (interleaved thinking).
A model with `chat_stream` (LLM, or the chat CLI's server client) is streamed and its pieces are reported
as they arrive; one with only LLM.chat's signature (tests' scripted replies) is asked for whole replies.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from glm47.parsers import ToolCall
from glm47.tools import TOOLS, run_tool


class ChatModel(Protocol):
    def chat(self, messages: list[dict], tools: list[dict] | None = None, sampling_params: Any = None,
             enable_thinking: bool = True, clear_thinking: bool = True) -> Any: ...


# on_event(kind, payload): "reasoning" str and "content" str are pieces of the reply as they arrive (a model
# without chat_stream gives its reasoning whole, and content only when written next to tool calls);
# "tool_call" {"id", "name", "arguments"}, "tool_result" {"id", "name", "content"}; "answer" str, the final
# reply's whole content (already reported in pieces when streamed); "max_rounds" int.
OnEvent = Callable[[str, Any], None]


@dataclass(slots=True)
class Reply:
    """One model reply, whole: what LLM.chat returns, minus the raw text and token counts."""
    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None


def run_agent(llm: ChatModel, messages: list[dict], tools: list[dict] | None = None, sampling_params: Any = None,
              enable_thinking: bool = True, max_rounds: int = 8, on_event: OnEvent | None = None, *,
              clear_thinking: bool = True) -> list[dict]:
    """The messages this turn adds to `messages` (which is not modified): assistant turns with
    reasoning_content / content / tool_calls, and a tool message after each call. tools: the definitions
    offered (None: every built-in tool; [] offers none). A call to a tool that was not offered gets an
    error result instead of running, so the model can recover."""
    if max_rounds < 1:
        raise ValueError(f"max_rounds must be >= 1, got {max_rounds}")
    tools = TOOLS if tools is None else tools
    offered = {(t.get("function") or t).get("name") for t in tools}
    emit = on_event or (lambda kind, payload: None)
    new: list[dict] = []
    for _ in range(max_rounds):
        out = ask(llm, messages + new, tools, sampling_params, enable_thinking, clear_thinking, emit)
        turn: dict = {"role": "assistant", "content": out.content or ""}
        if out.reasoning_content:
            turn["reasoning_content"] = out.reasoning_content
        new.append(turn)
        if not out.tool_calls:
            emit("answer", turn["content"])
            return new
        turn["tool_calls"] = [_call_message(call) for call in out.tool_calls]
        for call, message in zip(out.tool_calls, turn["tool_calls"]):
            arguments = message["function"]["arguments"]
            emit("tool_call", {"id": call.id, "name": call.name, "arguments": arguments})
            if call.name in offered:
                result = run_tool(call.name, arguments)
            else:
                result = f"error: unknown tool {call.name!r}; available: {', '.join(sorted(offered)) or 'none'}"
            emit("tool_result", {"id": call.id, "name": call.name, "content": result})
            new.append({"role": "tool", "tool_call_id": call.id, "name": call.name, "content": result})
    emit("max_rounds", max_rounds)
    return new


def ask(llm: ChatModel, messages: list[dict], tools: list[dict], sampling_params: Any, enable_thinking: bool,
        clear_thinking: bool, emit: OnEvent) -> Reply:
    """One model reply; reports its reasoning and content pieces (streamed when the model can)."""
    kw = dict(enable_thinking=enable_thinking, clear_thinking=clear_thinking)
    stream = getattr(llm, "chat_stream", None)
    if stream is not None:
        return collect(stream(messages, tools, sampling_params, **kw), emit)
    out = llm.chat(messages, tools, sampling_params, **kw)
    if out.reasoning_content:
        emit("reasoning", out.reasoning_content)
    if out.content and out.tool_calls:
        emit("content", out.content)
    return Reply(out.reasoning_content, out.content, list(out.tool_calls), out.finish_reason)


def collect(chunks: Iterable[Any], emit: OnEvent) -> Reply:
    """Joins streamed chunks (LLM.chat_stream's ChatChunk or the server client's RemoteChunk: .delta, and
    .finish_reason on the last) into a whole reply, reporting reasoning and content pieces on the way."""
    reasoning, content, calls, reason = [], [], {}, None
    for chunk in chunks:
        d = chunk.delta
        if d is None:
            reason = chunk.finish_reason or reason
        elif d.reasoning_content:
            reasoning.append(d.reasoning_content)
            emit("reasoning", d.reasoning_content)
        elif d.content:
            content.append(d.content)
            emit("content", d.content)
        for part in (d.tool_calls if d is not None else None) or ():
            if part.id is not None:  # a call's first piece: id and whole name
                calls[part.index] = ToolCall(part.id, part.name, "")
            calls[part.index].arguments += part.arguments
    if reason == "length" and calls and not _is_object(calls[max(calls)].arguments):
        del calls[max(calls)]  # cut off by max_tokens while writing its arguments: no call, as LLM.chat says
    return Reply(_text_or_none(reasoning), _text_or_none(content), list(calls.values()), reason)


def _text_or_none(parts: list[str]) -> str | None:
    text = "".join(parts)
    return text if text.strip() else None


def _is_object(arguments: str) -> bool:
    try:
        return isinstance(json.loads(arguments or "{}"), dict)
    except ValueError:
        return False


def _call_message(call: ToolCall) -> dict:
    # The parser always writes a JSON object; anything else would be a parser bug, so fail loudly.
    arguments = json.loads(call.arguments) if call.arguments else {}
    assert isinstance(arguments, dict), (call.name, call.arguments)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
