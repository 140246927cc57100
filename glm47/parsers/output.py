"""parse_output: a whole GLM-4.7 output parsed at once into reasoning, content and tool calls. It runs
the same Splitter as OutputStream over the text and joins the deltas, so the two cannot drift apart."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from glm47.parsers.splitter import Splitter


@dataclass(slots=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # a JSON object text, ensure_ascii=False, json.dumps' default separators


@dataclass(slots=True)
class ParsedOutput:
    reasoning_content: str | None  # None when blank
    content: str | None  # None when blank
    tool_calls: list[ToolCall] = field(default_factory=list)


def parse_output(text: str, tools: list[dict] | None = None, thinking: bool = True, finished: bool = True,
                 *, call_id: Callable[[int], str] | None = None) -> ParsedOutput:
    """Parse `text`, the model's output after a prompt that ended in <think> (thinking=True, see
    prompt_ends_in_think) or not. tools: the request's tools (None: accept every call, untyped).
    finished=True: the output is complete, so a call without </tool_call> is no call and its raw text is
    content. finished=False: `text` is a prefix of an output still being generated; the result is what
    OutputStream has sent after being fed `text` (an open call is not in it yet, a possible marker at the
    very end is left out). call_id(index) makes ids; default random "call_...". Never raises on anything
    the model writes."""
    splitter = Splitter(tools, thinking, call_id)
    deltas = splitter.feed(text) + (splitter.close() if finished else [])
    reasoning, content, calls = [], [], {}
    for d in deltas:
        if d.reasoning_content is not None:
            reasoning.append(d.reasoning_content)
        elif d.content is not None:
            content.append(d.content)
        for part in d.tool_calls or ():
            if part.id is not None:
                calls[part.index] = ToolCall(part.id, part.name, "")
            calls[part.index].arguments += part.arguments
    return ParsedOutput(_text_or_none(reasoning), _text_or_none(content), list(calls.values()))


def _text_or_none(parts: list[str]) -> str | None:
    text = "".join(parts)
    return text if text.strip() else None
