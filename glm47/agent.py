"""The agent loop: ask the model, run the built-in tools it calls, feed their results back, and repeat until
it answers without a tool call (or max_rounds model calls have been made). Each assistant turn keeps its
reasoning, so the model sees its own earlier thoughts in the same user turn (interleaved thinking).
Needs only an object with LLM.chat's signature, so tests drive it with scripted replies.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Protocol

from glm47.parsers import ToolCall
from glm47.tools import TOOLS, run_tool


class ChatModel(Protocol):
    def chat(self, messages: list[dict], tools: list[dict] | None = None, sampling_params: Any = None,
             enable_thinking: bool = True, clear_thinking: bool = True) -> Any: ...


# on_event(kind, payload): "reasoning" str, "content" str (text written next to tool calls), "tool_call"
# {"id", "name", "arguments"}, "tool_result" {"id", "name", "content"}, "answer" str, "max_rounds" int.
OnEvent = Callable[[str, Any], None]


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
        out = llm.chat(messages + new, tools, sampling_params, enable_thinking=enable_thinking,
                       clear_thinking=clear_thinking)
        if out.reasoning_content:
            emit("reasoning", out.reasoning_content)
        turn: dict = {"role": "assistant", "content": out.content or ""}
        if out.reasoning_content:
            turn["reasoning_content"] = out.reasoning_content
        new.append(turn)
        if not out.tool_calls:
            emit("answer", turn["content"])
            return new
        if out.content:
            emit("content", out.content)
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


def _call_message(call: ToolCall) -> dict:
    # The parser always writes a JSON object; anything else would be a parser bug, so fail loudly.
    arguments = json.loads(call.arguments) if call.arguments else {}
    assert isinstance(arguments, dict), (call.name, call.arguments)
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": arguments}}
