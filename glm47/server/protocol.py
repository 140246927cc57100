"""Request bodies of the OpenAI-style endpoints (pydantic models) and their translation into what the engine
and the chat template take: SamplingParams, messages, tools, thinking flags. Every problem with a request
raises ApiError (status, message, param), which app.py turns into the OpenAI or Anthropic error body.
Unknown fields are accepted and ignored, as OpenAI clients send many (user, store, metadata, ...)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from glm47.sampling_params import RECOMMENDED_TEMPERATURE, RECOMMENDED_TOP_P, ContextTooLong, SamplingParams


class ApiError(Exception):
    """An HTTP error answer. `kind` overrides the error type the status implies (see app.error_body)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers, self.kind = headers, kind


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


def parse_body(body: bytes, model: type[BaseModel]) -> Any:
    """The JSON body validated as `model`; ApiError 400 naming the field for anything wrong. pydantic-core
    parses and validates in one pass (jiter): invalid UTF-8, lone surrogates ("\\ud800"), numbers of more
    than 4,300 digits and nesting deeper than 200 are JSON errors, never exceptions of ours."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise bad_request(f"the request body is not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}"
                              ) from None
        if not err["loc"]:
            raise bad_request(f"the request body must be a JSON object ({err['msg']})") from None
        # For a field with several accepted types pydantic puts the failing type in the location: drop it.
        loc = [p for p in err["loc"] if isinstance(p, int) or str(p).split("[")[0] not in _TYPE_TAGS]
        param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        raise bad_request(f"{param}: {err['msg']}" if param else err["msg"], param or None) from None


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "literal", "none"}


def body_schema(model: type[BaseModel]) -> dict:
    """openapi_extra for a route that parses its own body (parse_body): the model's JSON schema as the
    request body of /openapi.json, nested models inlined."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(x):
        if isinstance(x, dict):
            if "$ref" in x:
                return inline(defs[x["$ref"].rsplit("/", 1)[1]])
            return {k: inline(v) for k, v in x.items()}
        return [inline(v) for v in x] if isinstance(x, list) else x

    return {"requestBody": {"required": True, "content": {"application/json": {"schema": inline(schema)}}}}

# Bounds on the size of a request, checked while it is parsed, before any work: each costs the engine or the
# renderer work per item (OpenAI allows 128 tools; Anthropic 100,000 messages).
MAX_MESSAGES = 100_000
MAX_TOOLS = 512


class Body(BaseModel):
    # Unknown fields are ignored, not rejected. Strict types: "10" is no integer, "yes" no boolean, true no
    # token id; integers are accepted for floats. Infinity and NaN are no floats.
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class StreamOptions(Body):
    include_usage: bool = False


class ZaiThinking(Body):
    """Z.ai's `thinking` field (also accepts Anthropic's shape: budget_tokens is ignored)."""
    type: Literal["enabled", "disabled", "adaptive"] = "enabled"
    clear_thinking: bool | None = None


class ThinkingFields(Body):
    # Every dialect clients use for GLM's thinking switches (API_NOTES §1.11); see thinking_flags().
    thinking: ZaiThinking | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    enable_thinking: bool | None = None
    clear_thinking: bool | None = None
    reasoning_effort: str | None = None


class SamplingFields(Body):
    model: str | None = None
    n: int = Field(1, ge=1, le=128)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    do_sample: bool | None = None  # Z.ai: false means greedy
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields, ThinkingFields):
    messages: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_MESSAGES)
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    # str, or a list of str, of token ids or of lists of token ids: checked by openai_api._prompt_ids, which
    # stops at the first bad item (a union of list types would validate a 1.5M-id list three times)
    prompt: str | list
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(ThinkingFields):
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = Field(None, max_length=MAX_MESSAGES)
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    add_generation_prompt: bool = True
    return_token_strs: bool = False


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]


def sampling_params(req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    max_tokens_field: str = "max_tokens", logprobs_field: str = "logprobs") -> SamplingParams:
    """One sample's SamplingParams (n is the caller's: n samples with seeds seed, seed+1, ...).
    max_tokens_field / logprobs_field: the request fields those came from, which an error about them names."""
    bias = None
    if req.logit_bias:
        try:  # JSON object keys are strings: "1234": -100
            bias = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise bad_request("logit_bias keys must be token ids", "logit_bias") from None
    # GLM-4.7's recommended sampling when a request omits it
    temperature = RECOMMENDED_TEMPERATURE if req.temperature is None else req.temperature
    if req.do_sample is False:
        temperature = 0.0
    given = {name: getattr(req, name) for name in ("top_k", "min_p", "repetition_penalty", "presence_penalty",
                                                  "frequency_penalty") if getattr(req, name) is not None}
    kw = dict(temperature=temperature, top_p=RECOMMENDED_TOP_P if req.top_p is None else req.top_p, **given,
              seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens, stop=req.stop,
              stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
              skip_special_tokens=req.skip_special_tokens,
              include_stop_str_in_output=req.include_stop_str_in_output, logit_bias=bias)
    try:
        return SamplingParams(**kw)
    except ValueError as e:
        raise params_error(e, {"max_tokens": max_tokens_field, "logprobs": logprobs_field}) from None


def params_error(e: ValueError, renamed: dict[str, str] | None = None) -> ApiError:
    """A 400 for SamplingParams' or the engine's ValueError. A ParamError names its field, which becomes
    `param` as the request calls it (`renamed`: SamplingParams' name -> the request's), in the message too."""
    message, field = str(e), getattr(e, "field", None)
    if field is not None and renamed and field in renamed:
        if message.startswith(field):
            message = renamed[field] + message[len(field):]
        field = renamed[field]
    return bad_request(message, field)


def samples(prompt: list[int], params: SamplingParams, n: int) -> list[tuple[list[int], SamplingParams]]:
    """n engine requests for one prompt (see SamplingParams.for_sample)."""
    return [(prompt, params.for_sample(k)) for k in range(n)]


def thinking_flags(req: ThinkingFields, default_clear: bool) -> tuple[bool, bool]:
    """(enable_thinking, clear_thinking). GLM-4.7 thinks by default; later sources override earlier ones:
    reasoning_effort "none" < top-level enable/clear_thinking < Z.ai `thinking` < chat_template_kwargs."""
    enable, clear = True, default_clear
    if req.reasoning_effort is not None:
        enable = req.reasoning_effort != "none"
    enable = enable if req.enable_thinking is None else req.enable_thinking
    clear = clear if req.clear_thinking is None else req.clear_thinking
    if req.thinking is not None:
        enable = req.thinking.type != "disabled"
        clear = clear if req.thinking.clear_thinking is None else req.thinking.clear_thinking
    for key in ("enable_thinking", "clear_thinking"):
        value = (req.chat_template_kwargs or {}).get(key)
        if value is not None and not isinstance(value, bool):
            raise bad_request(f"chat_template_kwargs.{key} must be true or false, got {value!r}",
                              f"chat_template_kwargs.{key}")
    kw = req.chat_template_kwargs or {}
    enable = enable if kw.get("enable_thinking") is None else kw["enable_thinking"]
    clear = clear if kw.get("clear_thinking") is None else kw["clear_thinking"]
    return enable, clear


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as the template takes them: `developer` is a system message; only text parts.
    (Roles, reasoning fields and tool calls are checked by glm47.chat when the prompt is rendered.)"""
    out = []
    for i, m in enumerate(messages):
        if m.get("role") == "developer":
            m = {**m, "role": "system"}
        content = m.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                if isinstance(part, dict) and part.get("type", "text") != "text":
                    raise bad_request(f"messages[{i}].content[{j}]: only text parts are supported by this model, "
                                      f"got {part.get('type')!r}", f"messages[{i}].content[{j}]")
        out.append(m)
    return order_tool_results(out)


def chat_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict | None) -> list[dict] | None:
    """The tools the prompt shows and the parser accepts (None: no tools)."""
    if tool_choice not in (None, "auto", "none"):
        # Forcing a call needs constrained decoding, which the engine does not have yet.
        raise bad_request(f"tool_choice {json.dumps(tool_choice)} is not supported; use 'auto' or 'none'",
                          "tool_choice")
    if not tools or tool_choice == "none":
        return None
    for i, tool in enumerate(tools):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise bad_request(f"tools[{i}]: only {{'type': 'function', 'function': {{...}}}} tools are supported",
                              f"tools[{i}]")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}].function.name must be a non-empty string", f"tools[{i}].function.name")
    return tools


def order_tool_results(messages: list[dict]) -> list[dict]:
    """Each run of tool messages after an assistant message with tool calls, put in the order of its calls.
    GLM-4.7's format has no call ids: the model pairs the n-th result with the n-th call, and clients send
    parallel results in the order they finished (Claude Code sent [Read, Bash] for [Bash, Read])."""
    out: list[dict] = []
    run: list[dict] = []  # the tool messages since the last other message
    order: dict[str, int] = {}  # call id -> position among the last assistant message's calls

    def flush() -> None:  # unknown ids keep their place after the known ones (the sort is stable)
        out.extend(sorted(run, key=lambda t: order.get(t.get("tool_call_id"), len(order))))
        run.clear()

    for m in messages:
        if m.get("role") == "tool":
            run.append(m)
            continue
        flush()
        out.append(m)
        if m.get("role") == "assistant":
            calls = m.get("tool_calls") or []
            order = {c.get("id"): k for k, c in enumerate(calls) if isinstance(c, dict) and c.get("id")}
    flush()
    return out


def check_response_format(response_format: dict[str, Any] | None) -> None:
    kind = (response_format or {}).get("type", "text")
    if kind != "text":
        raise bad_request(f"response_format {kind!r} is not supported yet (it needs constrained decoding)",
                          "response_format")


def max_tokens_of(req: ChatCompletionRequest) -> tuple[int | None, str]:
    """(the reply's token limit, the field that set it). Cline sends max_completion_tokens, Roo Code
    max_tokens; the newer name wins."""
    if req.max_completion_tokens is not None:
        return req.max_completion_tokens, "max_completion_tokens"
    return req.max_tokens, "max_tokens"


def context_error(e: ContextTooLong) -> ApiError:
    """The OpenAI-style context-length error (OpenAI's and vLLM's wording, which clients match). `param` names
    what to shrink: the prompt when it alone fills the context, else max_tokens."""
    limit, num_prompt, max_tokens = e.limit, e.num_prompt_tokens, e.max_tokens
    intro = f"This model's maximum context length is {limit} tokens. However, "
    if e.lower_bound:
        message = (f"{intro}your {e.prompt_field} resulted in more than {num_prompt} tokens. Please reduce the "
                   f"length of the {e.prompt_field}.")
    elif max_tokens is None:
        message = (f"{intro}your messages resulted in {num_prompt} tokens. Please reduce the length of the "
                   f"messages.")
    else:
        message = (f"{intro}you requested {num_prompt + max_tokens} tokens ({num_prompt} in the messages, "
                   f"{max_tokens} in the completion). Please reduce the length of the messages or completion.")
        if not e.prompt_overflows:
            message += f" With these messages {e.max_tokens_field} can be at most {limit - num_prompt}."
    return bad_request(message, e.field, "context_length_exceeded")
