"""Checks chat messages and brings OpenAI-style input into the shape the GLM-4.7 template expects.

Both renderers (the native one in template.py and the official jinja template) receive these normalised
messages, so they agree byte for byte. Nothing here renders text or touches tokens. Every problem raises
ValueError naming the offending place, e.g. "messages[3].tool_calls[0]: ...".
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

ROLES = ("system", "user", "assistant", "tool")
# Names a message's reasoning arrives under; the first non-null wins, as in transformers.
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """New message dicts (the input is not modified), normalised as follows:

    - `content` null or missing becomes "" (the template would print "None"); a string or a list of parts
      (`{"type": "text", "text": ...}` or plain strings; other part types are kept and ignored) is kept.
    - tool messages: a list made only of OpenAI text parts is one result and becomes their joined text; any
      other list is the template's several-results form, whose items must be strings or `{"output": ...}`
      (a non-string output is written as JSON).
    - assistant reasoning from `reasoning_content`, `thinking` or `reasoning` goes to `reasoning_content`.
    - tool calls keep their shape (with or without the `function` wrapper); `arguments` given as a JSON
      string (as OpenAI clients send it) is decoded to a dict, and null, missing or "" become {}.
    """
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of message objects")
    return [_normalize_message(m, f"messages[{i}]") for i, m in enumerate(messages)]


def normalize_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The tool schemas as plain dicts (each written as one JSON line in the prompt), or None."""
    if tools is None:
        return None
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise ValueError("tools must be a list of tool objects")
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise ValueError(f"tools[{i}]: must be an object, got {type(tool).__name__}")
    return [dict(tool) for tool in tools]


def _normalize_message(message: Any, where: str) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ValueError(f"{where}: must be an object, got {type(message).__name__}")
    if "role" not in message:
        raise ValueError(f"{where}: missing 'role'")
    role = message["role"]
    if role not in ROLES:
        raise ValueError(f"{where}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    out = dict(message)
    out["content"] = _content(message.get("content"), where)
    if role == "tool":
        out["content"] = _tool_content(out["content"], where)
    elif role == "assistant":
        reasoning = next((message[f] for f in REASONING_FIELDS if message.get(f) is not None), None)
        if reasoning is None:
            out.pop("reasoning_content", None)  # absent: the template then looks for <think> in the content
        elif not isinstance(reasoning, str):
            raise ValueError(f"{where}: reasoning_content must be a string, got {type(reasoning).__name__}")
        else:
            out["reasoning_content"] = reasoning
        calls = message.get("tool_calls")
        if calls is None:
            out.pop("tool_calls", None)
        elif isinstance(calls, (str, Mapping)) or not isinstance(calls, Sequence):
            raise ValueError(f"{where}: tool_calls must be a list")
        else:
            out["tool_calls"] = [_tool_call(c, f"{where}.tool_calls[{j}]") for j, c in enumerate(calls)]
    return out


def _content(content: Any, where: str) -> str | list[Any]:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        for j, part in enumerate(content):
            if isinstance(part, Mapping):
                if part.get("type") == "text" and not isinstance(part.get("text"), str):
                    raise ValueError(f"{where}.content[{j}]: text part needs a string 'text'")
            elif not isinstance(part, str):
                raise ValueError(f"{where}.content[{j}]: must be a string or a part object")
        return list(content)
    raise ValueError(f"{where}: content must be a string, a list of parts or null, got {type(content).__name__}")


def _is_text_part(part: Any) -> bool:
    return isinstance(part, Mapping) and part.get("type") == "text"


def _tool_content(content: str | list[Any], where: str) -> str | list[Any]:
    if isinstance(content, str) or not content:
        return content
    if all(_is_text_part(p) for p in content):
        return "".join(p["text"] for p in content)
    results = []
    for j, item in enumerate(content):
        if isinstance(item, str):
            results.append(item)
        elif isinstance(item, Mapping) and "output" in item:
            output = item["output"]
            results.append({"output": output if isinstance(output, str) else json.dumps(output, ensure_ascii=False)})
        else:
            raise ValueError(f"{where}.content[{j}]: a tool result must be a string or an object with 'output'")
    return results


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: must be an object, got {type(call).__name__}")
    out = dict(call)
    # The template reads `function` when it is truthy, else the call's own name/arguments.
    if call.get("function"):
        if not isinstance(call["function"], Mapping):
            raise ValueError(f"{where}: 'function' must be an object")
        out["function"] = fn = dict(call["function"])
        where += ".function"
    else:
        fn = out
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: tool call has no name")
    fn["arguments"] = _arguments(fn.get("arguments"), where)
    return out


def _arguments(arguments: Any, where: str) -> dict[str, Any]:
    if arguments is None:
        return {}
    if isinstance(arguments, str):
        if not arguments.strip():
            return {}
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: arguments are not valid JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(arguments, dict):
            raise ValueError(f"{where}: arguments must be a JSON object, got {type(arguments).__name__}")
        return arguments
    if isinstance(arguments, Mapping):
        return dict(arguments)
    raise ValueError(f"{where}: arguments must be an object or a JSON string, got {type(arguments).__name__}")
