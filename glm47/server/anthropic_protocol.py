"""Anthropic Messages request bodies (pydantic) and their translation into GLM chat input: system text and
`role: "system"` messages folded into one system prompt (Claude Code sends both), thinking / text /
tool_use blocks into an assistant message, tool_result blocks into tool messages, `input_schema` tools into
OpenAI-style function tools. Problems raise ApiError; nothing here renders the prompt or runs the model."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from glm47.sampling_params import RECOMMENDED_TEMPERATURE, RECOMMENDED_TOP_P, ContextTooLong, SamplingParams
from glm47.server.protocol import (MAX_MESSAGES, MAX_TOOLS, ApiError, Body, bad_request, order_tool_results,
                                   params_error)

# Claude Code prepends a system block whose hash changes every request; it would defeat the prefix cache.
BILLING_HEADER = "x-anthropic-billing-header"


class Thinking(Body):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None  # GLM-4.7 has no reasoning budget: accepted and ignored


class CountTokensRequest(Body):
    model: str
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: dict[str, Any] | None = None
    thinking: Thinking | None = None
    context_management: dict[str, Any] | None = None  # Claude Code: clear_thinking_* edits (keep: "all")
    output_config: dict[str, Any] | None = None  # format: a JSON schema for the reply (needs constrained decoding)

    def clear_thinking(self, default: bool) -> bool:
        """False when a clear_thinking edit says keep "all" (every turn's reasoning stays in the prompt:
        preserved thinking); otherwise the server's default."""
        edits = (self.context_management or {}).get("edits") or []
        keep_all = any(isinstance(e, dict) and str(e.get("type", "")).startswith("clear_thinking")
                       and e.get("keep") == "all" for e in edits)
        return False if keep_all else default

    def check_output_config(self) -> None:
        if (self.output_config or {}).get("format") is not None:
            raise bad_request("output_config.format (JSON output) needs constrained decoding, which this server "
                              "does not have yet", "output_config.format")


class MessagesRequest(CountTokensRequest):
    max_tokens: int
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None


def to_chat(req: CountTokensRequest) -> tuple[list[dict], list[dict] | None, bool]:
    """(messages, tools, enable_thinking) for the GLM chat template."""
    system = _system_texts(req.system, "system")
    messages: list[dict] = []
    for i, m in enumerate(req.messages):
        where = f"messages[{i}]"
        role = m.get("role")
        if role == "system":  # folded into the one system prompt, wherever it appears
            system += _system_texts(m.get("content"), where)
        elif role == "user":
            messages += _user_turn(_blocks(m.get("content"), where), where)
        elif role == "assistant":
            messages.append(_assistant_turn(_blocks(m.get("content"), where), where))
        else:
            raise bad_request(f"{where}.role: unknown role {role!r} (expected user, assistant or system)",
                              f"{where}.role")
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    enable = req.thinking is None or req.thinking.type != "disabled"  # GLM-4.7 thinks unless told not to
    return order_tool_results(messages), _tools(req.tools, req.tool_choice), enable


def sampling_params(req: MessagesRequest) -> SamplingParams:
    try:
        return SamplingParams(
            temperature=RECOMMENDED_TEMPERATURE if req.temperature is None else req.temperature,
            top_p=RECOMMENDED_TOP_P if req.top_p is None else req.top_p, top_k=req.top_k or 0,
            max_tokens=req.max_tokens, stop=req.stop_sequences or None)
    except ValueError as e:
        raise params_error(e, {"stop": "stop_sequences"}) from None


def context_error(e: ContextTooLong) -> ApiError:
    """Anthropic's context errors, worded as its API words them: Claude Code matches on the wording to
    compact the conversation or lower max_tokens."""
    more = "more than " if e.lower_bound else ""
    if e.prompt_overflows:
        return bad_request(f"prompt is too long: {more}{e.num_prompt_tokens} tokens > {e.limit - 1} maximum",
                           e.field)
    return bad_request(f"input length and `max_tokens` exceed context limit: {e.num_prompt_tokens} + "
                       f"{e.max_tokens} > {e.limit}, decrease input length or `max_tokens` and try again", e.field)


def _blocks(content: Any, where: str) -> list[dict]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise bad_request(f"{where}.content must be a string or a list of content blocks", f"{where}.content")
    return content


def _text(block: dict, where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise bad_request(f"{where}.text must be a string", f"{where}.text")
    return text


def _system_texts(system: Any, where: str) -> list[str]:
    if system is None:
        return []
    texts = []
    for j, block in enumerate(_blocks(system, where)):
        if block.get("type") in ("text", "mid_conv_system"):
            text = _text(block, f"{where}[{j}]")
            if text.strip() and not text.startswith(BILLING_HEADER):
                texts.append(text)
    return texts


def _unsupported(block: dict, where: str) -> ApiError:
    return bad_request(f"{where}: {block.get('type')!r} blocks are not supported by this text-only model", where)


def _user_turn(blocks: list[dict], where: str) -> list[dict]:
    """Tool results become tool messages (the template's <|observation|>), then the user's own text."""
    results, texts = [], []
    for j, b in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = b.get("type")
        if kind == "text":
            texts.append(_text(b, at))
        elif kind == "tool_result":
            if not isinstance(b.get("tool_use_id"), str):
                raise bad_request(f"{at}.tool_use_id must be a string", f"{at}.tool_use_id")
            results.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                            "content": _tool_result_text(b.get("content"), at)})
        elif kind in ("image", "document"):
            raise _unsupported(b, at)
        # Other blocks (cache markers, search results, ...) carry nothing the model can read: skipped.
    user = [{"role": "user", "content": "".join(texts)}] if texts or not results else []
    return results + user


def _tool_result_text(content: Any, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for j, b in enumerate(_blocks(content, f"{where}.content")):
        if b.get("type") == "text":
            parts.append(_text(b, f"{where}.content[{j}]"))
        elif b.get("type") in ("image", "document"):
            raise _unsupported(b, f"{where}.content[{j}]")
    return "".join(parts)


def _assistant_turn(blocks: list[dict], where: str) -> dict:
    reasoning, texts, calls = [], [], []
    for j, b in enumerate(blocks):
        at = f"{where}.content[{j}]"
        kind = b.get("type")
        if kind == "thinking":  # its signature is ours or another server's: never checked
            if not isinstance(b.get("thinking"), str):
                raise bad_request(f"{at}.thinking must be a string", f"{at}.thinking")
            reasoning.append(b["thinking"])
        elif kind == "text":
            texts.append(_text(b, at))
        elif kind == "tool_use":
            if not isinstance(b.get("name"), str) or not isinstance(b.get("input", {}), dict):
                raise bad_request(f"{at}: tool_use needs a string name and an object input", at)
            calls.append({"id": b.get("id"), "type": "function",
                          "function": {"name": b["name"], "arguments": b.get("input") or {}}})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts)}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: list[dict] | None, tool_choice: dict | None) -> list[dict] | None:
    kind = (tool_choice or {}).get("type", "auto")
    if kind not in ("auto", "none"):
        # Forcing a call needs constrained decoding, which the engine does not have yet.
        raise bad_request(f"tool_choice type {kind!r} is not supported; use 'auto' or 'none'", "tool_choice")
    if not tools or kind == "none":
        return None
    out = []
    for i, t in enumerate(tools):
        if t.get("type") not in (None, "custom"):
            continue  # server tools (web search, ...) run on Anthropic's side: there is nothing to call here
        if not isinstance(t.get("name"), str) or not t["name"]:
            raise bad_request(f"tools[{i}].name must be a non-empty string", f"tools[{i}].name")
        schema = t.get("input_schema")
        if not isinstance(schema, dict):
            raise bad_request(f"tools[{i}].input_schema must be a JSON schema object", f"tools[{i}].input_schema")
        fn = {"name": t["name"]}
        if t.get("description"):
            fn["description"] = t["description"]
        fn["parameters"] = schema
        out.append({"type": "function", "function": fn})
    return out or None
