"""The GLM-4.7 prompt format in plain Python: chat messages (+ tool schemas) -> prompt text or token ids.

`render_prompt` is byte-identical to the official chat_template.jinja rendered the Hugging Face way (a test
pins it on a generated corpus). `render_ids` turns only the renderer's own markers into control tokens and can
return the assistant loss mask for training. `render_with_jinja` renders a checkpoint's own template instead.
Parsing model output (reasoning, tool calls) is not done here: see glm47/parsers.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple, Protocol

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from glm47.chat.messages import normalize_messages, normalize_tools


class Segment(NamedTuple):
    text: str
    is_marker: bool  # one of the renderer's own control tokens (MARKERS), never text from a message
    assistant: bool  # written by the model, so trained on (the assistant loss mask)


# Every control token the renderer writes. Only these become special ids in render_ids.
MARKERS = frozenset({
    "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>",
    "<tool_response>", "</tool_response>",
})
# The model ends its turn by emitting one of these (they are stop ids), so they belong to the assistant mask
# when they follow an assistant message.
TURN_ENDERS = frozenset({"<|user|>", "<|observation|>"})

TOOLS_HEADER = (
    "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
)
_MARKER_RE = re.compile("(" + "|".join(map(re.escape, sorted(MARKERS, key=len, reverse=True))) + ")")


def render_segments(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
    add_generation_prompt: bool = True,
) -> list[Segment]:
    """The prompt as (text, is_marker, assistant) pieces; `render_prompt` joins them. Arguments as there."""
    messages = normalize_messages(messages)
    tools = normalize_tools(tools)
    out = [_marker("[gMASK]"), _marker("<sop>")]
    if tools:
        out += _tools_block(tools)
    # Reasoning is shown only after the last user message, unless thinking is preserved (clear_thinking off).
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    for i, m in enumerate(messages):
        role = m["role"]
        if role == "assistant":
            turn = _assistant_turn(m, show_reasoning=not clear_thinking or i > last_user)
        elif role == "tool":
            turn = _tool_turn(m, opens_run=i == 0 or messages[i - 1]["role"] != "tool")
        else:  # user, system
            turn = [_marker(f"<|{role}|>"), _text(_visible_text(m["content"]))]
        if i > 0 and messages[i - 1]["role"] == "assistant" and turn[0].text in TURN_ENDERS:
            turn[0] = turn[0]._replace(assistant=True)
        out += turn
    if add_generation_prompt:
        out += [_marker("<|assistant|>"), _marker("<think>" if enable_thinking else "</think>")]
    return [s for s in out if s.text]


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text, exactly as the official template renders it.

    enable_thinking: the generation prompt opens a reasoning block (`<|assistant|><think>`) or skips it
        (`<|assistant|></think>`). clear_thinking: drop the reasoning of assistant turns before the last user
        message (False keeps it: "preserved thinking"). Messages are checked and normalised first (see
        messages.normalize_messages); invalid ones raise ValueError naming the index.
    """
    segments = render_segments(messages, tools, enable_thinking=enable_thinking, clear_thinking=clear_thinking,
                               add_generation_prompt=add_generation_prompt)
    return "".join(s.text for s in segments)


class _Encoder(Protocol):
    def encode(self, text: str, allow_special: bool = False) -> list[int]: ...
    def token_to_id(self, token: str) -> int | None: ...


class PromptTooLong(ValueError):
    """The prompt surely has more than `num_tokens` tokens (found before encoding it); `field` is the request
    field it came from ("messages", or "prompt" for a raw one)."""

    def __init__(self, num_tokens: int, field: str = "messages"):
        super().__init__(f"the prompt has more than {num_tokens} tokens")
        self.num_tokens, self.field = num_tokens, field


def render_ids(
    tokenizer: _Encoder,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    enable_thinking: bool = True,
    clear_thinking: bool = True,
    add_generation_prompt: bool = True,
    return_assistant_mask: bool = False,
    max_tokens: int | None = None,
) -> list[int] | tuple[list[int], list[bool]]:
    """The prompt as token ids; with `return_assistant_mask`, also a per-token mask of what the model writes.

    Only MARKERS become control tokens: text from messages, tools and tool results is encoded as plain text
    even if it spells "<|user|>". The mask covers each assistant message after its `<|assistant|>` (reasoning,
    content, tool calls) and the `<|user|>`/`<|observation|>` that ends it; the generation prompt is unmasked.
    A final assistant message has no closing marker in the prompt: append one (e.g. `<|user|>`, a stop id)
    when training should teach the model to stop there. With `max_tokens`, a prompt whose text has more
    characters than max_tokens tokens can hold raises PromptTooLong before anything is encoded.
    """
    segments = render_segments(messages, tools, enable_thinking=enable_thinking, clear_thinking=clear_thinking,
                               add_generation_prompt=add_generation_prompt)
    if max_tokens is not None:  # PromptTooLong, before encoding, when the text alone cannot fit (a server's check)
        least = sum(len(s.text) for s in segments if not s.is_marker) // tokenizer.max_token_bytes
        if least > max_tokens:
            raise PromptTooLong(least)
    ids: list[int] = []
    mask: list[bool] = []
    # Consecutive text pieces are encoded together: BPE merges across their joins, exactly as it does when
    # the whole prompt is encoded (the tokenizer only splits at added tokens).
    for (is_marker, assistant), group in itertools.groupby(segments, key=lambda s: (s.is_marker, s.assistant)):
        if is_marker:
            new = [_marker_id(tokenizer, s.text) for s in group]
        else:
            new = tokenizer.encode("".join(s.text for s in group), allow_special=False)
        ids += new
        mask += [assistant] * len(new)
    return (ids, mask) if return_assistant_mask else ids


def render_with_jinja(
    template_text: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> str:
    """Renders a checkpoint's own chat template the way Hugging Face does (sandbox, trim/lstrip blocks, its
    `tojson`), on the same normalised messages as `render_prompt`. Extra kwargs (enable_thinking,
    clear_thinking, ...) become template variables."""
    return _compile(template_text).render(
        messages=normalize_messages(messages), tools=normalize_tools(tools),
        add_generation_prompt=add_generation_prompt, **template_kwargs,
    )


def _marker(text: str, assistant: bool = False) -> Segment:
    return Segment(text, True, assistant)


def _text(text: str, assistant: bool = False) -> Segment:
    return Segment(text, False, assistant)


def _fixed(text: str) -> list[Segment]:
    """Template text that contains markers (the tool-call example), split into markers and text."""
    return [Segment(p, p in MARKERS, False) for p in _MARKER_RE.split(text) if p]


def _marker_id(tokenizer: _Encoder, marker: str) -> int:
    token_id = tokenizer.token_to_id(marker)
    if token_id is None:
        raise ValueError(f"tokenizer has no {marker!r} token; is this a GLM-4.7 tokenizer?")
    return token_id


def _visible_text(content: str | list[Any]) -> str:
    """The template's visible_text macro: a string, or the text of the text parts and plain strings."""
    if isinstance(content, str):
        return content
    return "".join(
        p["text"] if isinstance(p, Mapping) and p.get("type") == "text" else p if isinstance(p, str) else ""
        for p in content
    )


def _tools_block(tools: list[dict[str, Any]]) -> list[Segment]:
    # One JSON line per tool, spelled like HF's tojson(ensure_ascii=False): json.dumps with default separators.
    schemas = "".join(json.dumps(tool, ensure_ascii=False) + "\n" for tool in tools)
    return [_marker("<|system|>"), _text(TOOLS_HEADER + schemas), *_fixed(TOOLS_FOOTER)]


def _assistant_turn(m: dict[str, Any], show_reasoning: bool) -> list[Segment]:
    content = _visible_text(m["content"])
    reasoning = m.get("reasoning_content")
    if reasoning is None:
        # No separate reasoning: take it from an inline "<think>…</think>" the way the template does, with
        # its quirks (text before <think> is dropped; only the part after the last </think> stays content).
        reasoning = ""
        if "</think>" in content:
            reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            content = content.split("</think>")[-1].lstrip("\n")
    out = [_marker("<|assistant|>")]
    if show_reasoning and reasoning:  # whitespace-only reasoning still renders as "<think></think>"
        out += [_marker("<think>", True), _text(reasoning.strip(), True), _marker("</think>", True)]
    else:
        out.append(_marker("</think>", True))
    if content.strip():
        out.append(_text(content.strip(), True))
    for call in m.get("tool_calls") or ():
        fn = call.get("function") or call
        out += [_marker("<tool_call>", True), _text(fn["name"], True)]
        for key, value in fn["arguments"].items():
            # Strings are written raw, everything else as JSON (so the string "1" and the number 1 differ).
            value = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            out += [_marker("<arg_key>", True), _text(str(key), True), _marker("</arg_key>", True),
                    _marker("<arg_value>", True), _text(value, True), _marker("</arg_value>", True)]
        out.append(_marker("</tool_call>", True))
    return out


def _tool_turn(m: dict[str, Any], opens_run: bool) -> list[Segment]:
    content = m["content"]
    if isinstance(content, str):
        # Consecutive string results share one <|observation|>.
        head = [_marker("<|observation|>")] if opens_run else []
        return [*head, _marker("<tool_response>"), _text(content), _marker("</tool_response>")]
    # The list form always opens its own <|observation|>, even right after another tool message (template quirk).
    out = [_marker("<|observation|>")]
    for item in content:
        result = item["output"] if isinstance(item, Mapping) else item
        out += [_marker("<tool_response>"), _text(result), _marker("</tool_response>")]
    return out


class _GenerationTag(jinja2.ext.Extension):
    """HF's `{% generation %}…{% endgeneration %}` block, which marks assistant text for its mask; here it
    just renders its body (render_ids computes the mask for the native format)."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: jinja2.runtime.Macro) -> str:
        return caller()


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # HF's filter: plain json.dumps. Jinja's own tojson would HTML-escape <, >, & and '.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ValueError(message)  # templates call this on input they reject


@functools.lru_cache(maxsize=8)
def _compile(template_text: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template_text)
