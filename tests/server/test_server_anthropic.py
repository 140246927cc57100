"""The Anthropic Messages API (what Claude Code talks) on a real socket, with a scripted engine: the SSE
event sequence, the official client's stream accumulation, a tool_use / tool_result round trip, thinking
on/off, stop sequences, count_tokens, both auth headers, errors in Anthropic's body and wording."""

import json

import anthropic
import httpx
import pytest
from server_util import AFTER_TOOL, running, script, sse_messages

from glm47.chat import Tokenizer
from glm47.server.app import create_app
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

KEY = "sk-ant-test"
MODEL = "claude-sonnet-4-6"  # what Claude Code asks for; the operator lists it as a served name
TOOLS = [{"name": "get_weather", "description": "Weather of a city", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}}}]


@pytest.fixture(scope="module")
def server():
    tok = Tokenizer.default()
    engine = ScriptedEngine(tok, script)
    app = create_app(engine, tok, ServerConfig(served_model_names=["glm-4.7", MODEL], api_key=KEY))
    with running(app) as url:
        yield url, engine, tok


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server[0], api_key=KEY, max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def test_stream_events_come_in_anthropics_order(server):
    body = {"model": MODEL, "max_tokens": 200, "stream": True, "tools": TOOLS, "messages": user("SCRIPT:tool")}
    with httpx.stream("POST", server[0] + "/v1/messages?beta=true", json=body, headers={"x-api-key": KEY}) as r:
        assert r.status_code == 200
        events = [(e, json.loads(d)) for e, d in sse_messages(r.iter_lines())]
    assert all(e == d["type"] for e, d in events)  # every message has its `event:` line
    names = [e for e, _ in events]
    assert names[:2] == ["message_start", "ping"] and names[-2:] == ["message_delta", "message_stop"]
    starts = [d for e, d in events if e == "content_block_start"]
    assert [(s["index"], s["content_block"]["type"]) for s in starts] == [(0, "thinking"), (1, "text"), (2, "tool_use")]
    # One block open at a time: each block's events sit between its start and its stop.
    open_index = None
    for e, d in events:
        if e == "content_block_start":
            assert open_index is None
            open_index = d["index"]
        elif e == "content_block_delta":
            assert d["index"] == open_index
        elif e == "content_block_stop":
            assert d["index"] == open_index
            open_index = None
    thinking = [d["delta"] for e, d in events if e == "content_block_delta" and d["index"] == 0]
    assert [t["type"] for t in thinking][-1] == "signature_delta" and thinking[-1]["signature"]
    assert "".join(t.get("thinking", "") for t in thinking) == "Need the weather."
    tool = [d["delta"]["partial_json"] for e, d in events if e == "content_block_delta" and d["index"] == 2]
    assert json.loads("".join(tool)) == {"city": "Paris", "days": 3}
    assert starts[2]["content_block"]["input"] == {} and starts[2]["content_block"]["id"].startswith("toolu_")
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "tool_use", "stop_sequence": None} and delta["usage"]["output_tokens"] > 0


def test_the_sdks_stream_accumulates_thinking_text_and_tool_use(client):
    with client.messages.stream(model=MODEL, max_tokens=200, tools=TOOLS, messages=user("SCRIPT:tool"),
                                thinking={"type": "enabled", "budget_tokens": 1024}) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text", "tool_use"]
    assert final.content[0].thinking == "Need the weather." and final.content[0].signature
    assert final.content[1].text == "Checking." and final.content[2].input == {"city": "Paris", "days": 3}
    assert final.stop_reason == "tool_use" and final.usage.output_tokens > 0


def test_tool_use_round_trip_and_non_streaming_shape(server, client):
    _, engine, tok = server
    first = client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=user("SCRIPT:tool"))
    assert first.stop_reason == "tool_use" and first.type == "message" and first.role == "assistant"
    call = first.content[-1]
    history = user("SCRIPT:tool") + [
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}]
    second = client.messages.create(model=MODEL, max_tokens=200, tools=TOOLS, messages=history)
    assert second.stop_reason == "end_turn"
    assert [(b.type, getattr(b, "text", None)) for b in second.content][-1] == ("text", AFTER_TOOL.split("</think>")[1])
    prompt = tok.decode(engine.prompts[-1])
    assert ("<think>Need the weather.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key>"
            "<arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
            "<|observation|><tool_response>sunny</tool_response><|assistant|><think>") in prompt


def test_thinking_disabled_system_folding_and_stop_sequences(server, client):
    _, engine, tok = server
    out = client.messages.create(model=MODEL, max_tokens=50, thinking={"type": "disabled"}, system="Be brief.",
                                 messages=user("hi") + [{"role": "assistant", "content": "ok"},
                                                        {"role": "system", "content": "Late instructions."},
                                                        {"role": "user", "content": "again"}])
    assert [b.type for b in out.content] == ["text"] and out.content[0].text == "Plain answer."
    prompt = tok.decode(engine.prompts[-1])
    assert prompt.startswith("[gMASK]<sop><|system|>Be brief.\n\nLate instructions.<|user|>hi")
    assert prompt.endswith("<|assistant|></think>")
    out = client.messages.create(model=MODEL, max_tokens=50, stop_sequences=["###"], messages=user("SCRIPT:stop"))
    assert out.stop_reason == "stop_sequence" and out.stop_sequence == "###" and out.content[-1].text == "one two "
    out = client.messages.create(model=MODEL, max_tokens=3, messages=user("SCRIPT:plain"))
    assert out.stop_reason == "max_tokens" and out.usage.output_tokens == 3


def test_a_zero_argument_tool_use_has_empty_input_on_the_beta_path(server, client):
    tools = [{"name": "now", "input_schema": {"type": "object", "properties": {}}}]
    out = client.beta.messages.create(model=MODEL, max_tokens=50, tools=tools, messages=user("SCRIPT:zero"))
    assert out.stop_reason == "tool_use" and (out.content[-1].name, out.content[-1].input) == ("now", {})
    body = {"model": MODEL, "max_tokens": 50, "stream": True, "tools": tools, "messages": user("SCRIPT:zero")}
    with httpx.stream("POST", server[0] + "/v1/messages?beta=true", json=body, headers={"x-api-key": KEY}) as r:
        events = [json.loads(d) for _, d in sse_messages(r.iter_lines())]
    parts = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"
             and e["delta"]["type"] == "input_json_delta"]
    assert "".join(parts) == "{}"  # the JSON of an empty input, never nothing
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_max_tokens_is_the_stop_reason_streamed_too(client):
    with client.messages.stream(model=MODEL, max_tokens=3, messages=user("SCRIPT:plain")) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 3


def test_count_tokens_is_the_prompt_length(server, client):
    _, engine, _ = server
    kw = dict(model=MODEL, tools=TOOLS, system="You help.", messages=user("SCRIPT:plain"))
    counted = client.messages.count_tokens(**kw).input_tokens
    out = client.messages.create(max_tokens=20, **kw)
    assert counted == len(engine.prompts[-1]) == out.usage.input_tokens + out.usage.cache_read_input_tokens
    r = httpx.post(server[0] + "/v1/messages/count_tokens?beta=true", headers={"x-api-key": KEY},
                   json={"model": MODEL, "messages": user("SCRIPT:plain")})
    assert r.status_code == 200 and r.json()["input_tokens"] > 0


def test_both_auth_headers_are_accepted(server):
    bearer = anthropic.Anthropic(base_url=server[0], api_key=None, auth_token=KEY, max_retries=0)
    assert bearer.messages.create(model=MODEL, max_tokens=5, messages=user("hi")).content
    for bad in (anthropic.Anthropic(base_url=server[0], api_key="nope", max_retries=0),
                anthropic.Anthropic(base_url=server[0], api_key=None, auth_token="nope", max_retries=0)):
        with pytest.raises(anthropic.AuthenticationError) as e:
            bad.messages.create(model=MODEL, max_tokens=5, messages=user("hi"))
        assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"


def test_errors_have_anthropics_body_and_wording(server, client):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.messages.create(model=MODEL, max_tokens=10, messages=user("word " * 5000))
    err = e.value.body["error"]
    assert err["type"] == "invalid_request_error"
    assert err["message"].startswith("prompt is too long: ") and err["message"].endswith(" tokens > 4095 maximum")
    with pytest.raises(anthropic.BadRequestError, match="exceed context limit"):
        client.messages.create(model=MODEL, max_tokens=8000, messages=user("hi"))
    with pytest.raises(anthropic.NotFoundError) as e:
        client.messages.create(model="claude-opus-9", max_tokens=10, messages=user("hi"))
    assert e.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                       "message": "The model `claude-opus-9` does not exist."}}
    cases = [({"model": MODEL, "messages": user("x")}, "max_tokens: Field required"),
             ({"model": MODEL, "max_tokens": -5, "messages": user("x")}, "max_tokens must be >= 1"),
             ({"model": MODEL, "max_tokens": 5, "messages": [{"role": "tool", "content": "x"}]}, "unknown role")]
    for body, words in cases:
        r = httpx.post(server[0] + "/v1/messages", json=body, headers={"x-api-key": KEY})
        assert r.status_code == 400 and r.json()["type"] == "error" and words in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("method, path, body, status, kind", [
    ("POST", "/v1/messages", b"{oops", 400, "invalid_request_error"),
    ("POST", "/v1/messages?beta=true", b'{"model": "glm-4.7", "max_tokens": 5, "messages": []}', 400,
     "invalid_request_error"),
    ("POST", "/v1/messages/count_tokens", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
     404, "not_found_error"),
    ("POST", "/v1/messages/nothing-here", b"{}", 404, "not_found_error"),
    ("GET", "/v1/messages", None, 405, "invalid_request_error"),
])
def test_every_error_has_the_anthropic_body_shape(server, method, path, body, status, kind):
    r = httpx.request(method, server[0] + path, content=body, headers={"x-api-key": KEY,
                                                                       "content-type": "application/json"})
    assert r.status_code == status and set(r.json()) == {"type", "error"} and r.json()["type"] == "error", r.text
    err = r.json()["error"]
    assert set(err) == {"type", "message"} and err["type"] == kind and err["message"], err
