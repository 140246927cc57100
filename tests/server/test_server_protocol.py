"""Request validation and translation of the server (no HTTP): OpenAI and Anthropic bodies into sampling
params, thinking flags, GLM chat messages; every problem an ApiError naming the field."""

import json

import pytest

from glm47.chat import Tokenizer, render_prompt
from glm47.sampling_params import ContextTooLong, context_overflow
from glm47.server import anthropic_protocol as ant
from glm47.server.protocol import (ApiError, ChatCompletionRequest, chat_messages, chat_tools, context_error,
                                   parse_body, sampling_params, thinking_flags)


def chat_request(**fields) -> ChatCompletionRequest:
    body = {"messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_body(json.dumps(body).encode(), ChatCompletionRequest)


def api_error(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as e:
        fn(*args)
    return e.value


@pytest.mark.parametrize("body, param, words", [
    (b"{not json", None, "not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    (b'{"messages": []}', "messages", "at least 1"),
    (b'{"messages": [{"role": "user"}], "n": 0}', "n", "greater than or equal to 1"),
    (b'{"messages": [{"role": "user"}], "stop": 5}', "stop", "valid string"),
    (b'{"messages": [{"role": "user"}], "thinking": {"type": "maybe"}}', "thinking.type", "'enabled'"),
    (b'{"messages": [{"role": "user"}], "temperature": "hot"}', "temperature", "valid number"),
])
def test_bad_bodies_are_400_naming_the_field(body, param, words):
    e = api_error(parse_body, body, ChatCompletionRequest)
    assert e.status == 400 and e.param == param and words in e.message, (e.param, e.message)


def test_sampling_defaults_are_glm47s_recommendation_and_fields_are_checked():
    p = sampling_params(chat_request(), None, None)
    assert (p.temperature, p.top_p, p.max_tokens) == (1.0, 0.95, None)
    p = sampling_params(chat_request(temperature=0.2, top_p=1.0, seed=3, stop="END"), 7, 2)
    assert (p.temperature, p.top_p, p.seed, p.stop, p.max_tokens, p.logprobs) == (0.2, 1.0, 3, ["END"], 7, 2)
    assert sampling_params(chat_request(do_sample=False), 5, None).temperature == 0  # Z.ai's greedy switch
    e = api_error(sampling_params, chat_request(), -1, None)
    assert (e.status, e.param) == (400, "max_tokens") and "-1" in e.message
    e = api_error(sampling_params, chat_request(max_completion_tokens=-1), -1, None, "max_completion_tokens")
    assert (e.param, e.message) == ("max_completion_tokens", "max_completion_tokens must be >= 1, got -1")
    assert sampling_params(chat_request(logit_bias={"1": 5, "30": -100}), 4, None).logit_bias == {1: 5.0, 30: -100.0}
    for bad, words in [({"x": 5}, "token ids"), ({"1": 101}, "[-100, 100]"), ({"-2": 1}, "[-100, 100]")]:
        e = api_error(sampling_params, chat_request(logit_bias=bad), 4, None)
        assert (e.status, e.param) == (400, "logit_bias") and words in e.message, e.message


@pytest.mark.parametrize("fields, expected", [
    ({}, (True, True)),
    ({"thinking": {"type": "disabled"}}, (False, True)),
    ({"thinking": {"type": "enabled", "clear_thinking": False}}, (True, False)),
    ({"chat_template_kwargs": {"enable_thinking": False}}, (False, True)),
    ({"thinking": {"type": "disabled"}, "chat_template_kwargs": {"enable_thinking": True}}, (True, True)),
    ({"reasoning_effort": "none"}, (False, True)),
    ({"reasoning_effort": "high", "clear_thinking": False}, (True, False)),
    ({"enable_thinking": False}, (False, True)),
])
def test_every_thinking_dialect_is_understood(fields, expected):
    assert thinking_flags(chat_request(**fields), True) == expected


def test_tools_and_tool_choice():
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert chat_tools(tools, "auto") == tools and chat_tools(tools, None) == tools
    assert chat_tools(tools, "none") is None
    for choice in ("required", {"type": "function", "function": {"name": "f"}}):
        e = api_error(chat_tools, tools, choice)
        assert e.param == "tool_choice" and "not supported" in e.message
    assert api_error(chat_tools, [{"type": "function", "function": {"name": ""}}], None).param == \
        "tools[0].function.name"


def test_openai_messages_developer_is_system_and_images_are_refused():
    out = chat_messages([{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hi"}])
    assert out[0]["role"] == "system"
    e = api_error(chat_messages, [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    assert e.param == "messages[0].content[0]" and "image_url" in e.message


def openai_context(num_prompt, max_tokens, limit, max_tokens_field="max_tokens", prompt_field="messages"):
    """The OpenAI-style answer of a chat route's context check (None: it fits)."""
    e = context_overflow(num_prompt, max_tokens, limit, prompt_field, max_tokens_field)
    return None if e is None else context_error(e)


def anthropic_context(num_prompt, max_tokens, limit):
    e = context_overflow(num_prompt, max_tokens, limit, "messages")
    return None if e is None else ant.context_error(e)


def test_openai_context_error_has_vllms_wording_and_names_what_to_shrink():
    assert openai_context(100, 50, 200) is None
    e = openai_context(180, 50, 200)
    assert e.code == "context_length_exceeded" and "maximum context length is 200 tokens" in e.message
    assert "230 tokens (180 in the messages, 50 in the completion)" in e.message
    # The messages fit, the completion does not: the fix is a smaller max_tokens, and the error says so.
    assert e.param == "max_tokens" and e.message.endswith("max_tokens can be at most 20.")
    e = openai_context(180, 50, 200, "max_completion_tokens")
    assert e.param == "max_completion_tokens" and "max_completion_tokens can be at most 20" in e.message
    e = openai_context(200, None, 200)
    assert "resulted in 200 tokens" in e.message and e.param == "messages"
    assert openai_context(250, 10, 200).param == "messages"  # the messages alone overflow
    assert openai_context(250, 10, 200, prompt_field="prompt").param == "prompt"


def test_a_prompt_counted_before_encoding_is_worded_as_more_than_its_bound():
    """The server counts a prompt's least token count before encoding it (ServerContext.encode, render_chat);
    each API says "more than" that many tokens."""
    e = ContextTooLong(300, None, 200, "prompt", lower_bound=True)
    assert e.field == "prompt" and isinstance(e, ValueError)
    assert context_error(e).message == ("This model's maximum context length is 200 tokens. However, your prompt "
                                        "resulted in more than 300 tokens. Please reduce the length of the prompt.")
    assert ant.context_error(e).message == "prompt is too long: more than 300 tokens > 199 maximum"


def messages_request(**fields) -> ant.MessagesRequest:
    body = {"model": "glm-4.7", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}], **fields}
    return parse_body(json.dumps(body).encode(), ant.MessagesRequest)


def test_anthropic_conversation_becomes_glm_messages():
    req = messages_request(
        system=[{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1; cch=abc;"},
                {"type": "text", "text": "You are Claude Code."}],
        tools=[{"name": "Read", "description": "Reads a file", "input_schema": {
            "type": "object", "properties": {"file_path": {"type": "string"}}}},
               {"type": "web_search_20250305", "name": "web_search"}],
        messages=[
            {"role": "user", "content": "Read package.json"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "anything"},
                {"type": "text", "text": "Reading."},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "package.json"}}]},
            {"role": "system", "content": "MCP says hello."},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "{}"}]}]},
        ])
    messages, tools, thinking = ant.to_chat(req)
    assert thinking is True  # GLM-4.7 thinks unless told not to
    assert messages[0] == {"role": "system", "content": "You are Claude Code.\n\nMCP says hello."}
    assert messages[2] == {"role": "assistant", "content": "Reading.", "reasoning_content": "I should read it.",
                           "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                               "name": "Read", "arguments": {"file_path": "package.json"}}}]}
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "{}"}
    assert [t["function"]["name"] for t in tools] == ["Read"]  # the server tool is dropped
    prompt = render_prompt(messages, tools)
    assert "<think>I should read it.</think>Reading.<tool_call>Read<arg_key>file_path</arg_key>" \
           "<arg_value>package.json</arg_value></tool_call><|observation|><tool_response>{}</tool_response>" in prompt
    assert "billing" not in prompt and prompt.endswith("<|assistant|><think>")


@pytest.mark.parametrize("fields, param, words", [
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "unknown role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0]",
     "not supported"),
    ({"tool_choice": {"type": "any"}}, "tool_choice", "not supported"),
    ({"tools": [{"name": "t"}]}, "tools[0].input_schema", "JSON schema"),
])
def test_anthropic_bad_input_names_the_place(fields, param, words):
    e = api_error(ant.to_chat, messages_request(**fields))
    assert e.status == 400 and e.param == param and words in e.message, (e.param, e.message)


def test_anthropic_thinking_switch_sampling_and_context_wording():
    assert ant.to_chat(messages_request(thinking={"type": "disabled"}))[2] is False
    assert ant.to_chat(messages_request(thinking={"type": "enabled", "budget_tokens": 2048}))[2] is True
    p = ant.sampling_params(messages_request(stop_sequences=["###"], top_k=5))
    assert (p.temperature, p.top_p, p.top_k, p.stop, p.max_tokens) == (1.0, 0.95, 5, ["###"], 64)
    assert api_error(ant.sampling_params, messages_request(max_tokens=0)).param == "max_tokens"
    assert anthropic_context(300, 10, 200).message == "prompt is too long: 300 tokens > 199 maximum"
    assert anthropic_context(150, 100, 200).message.startswith(
        "input length and `max_tokens` exceed context limit: 150 + 100 > 200")
    assert anthropic_context(150, 50, 200) is None


def test_count_tokens_body_needs_no_max_tokens():
    req = parse_body(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}', ant.CountTokensRequest)
    messages, tools, thinking = ant.to_chat(req)
    assert messages == [{"role": "user", "content": "hi"}] and tools is None and thinking
    assert len(Tokenizer.default().encode(render_prompt(messages), allow_special=True)) > 3
