"""The OpenAI-compatible API on a real socket, with a scripted engine so that replies contain reasoning and
tool calls: the stream's shape chunk by chunk, streaming = non-streaming, the official client's helpers,
a tool-call round trip, thinking on/off, n, logprobs, stop strings, completions, tokenize, errors, auth."""

import json

import httpx
import openai
import pytest
from server_util import AFTER_TOOL, TOOLS, chunks, running, script

from glm47.chat import Tokenizer
from glm47.server.app import create_app
from glm47.server.client import ServerClient, ServerError
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server():
    tok = Tokenizer.default()
    engine = ScriptedEngine(tok, script)
    app = create_app(engine, tok, ServerConfig(served_model_names=["glm-4.7", "glm-alias"], api_key=KEY))
    with running(app) as url:
        yield url, engine, tok


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0)


def user(text):
    return [{"role": "user", "content": text}]


def raw_stream(server, body) -> list[dict]:
    with httpx.stream("POST", server[0] + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        return chunks(r.iter_lines())


def test_tool_call_stream_has_openais_shape_chunk_by_chunk(server):
    cs = raw_stream(server, {"model": "glm-4.7", "messages": user("SCRIPT:tool"), "tools": TOOLS, "stream": True,
                             "stream_options": {"include_usage": True}})
    assert len({c["id"] for c in cs}) == 1 and all(c["object"] == "chat.completion.chunk" for c in cs)
    deltas = [c["choices"][0]["delta"] for c in cs if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert all("role" not in d for d in deltas[1:])  # role once: the SDK's accumulator concatenates strings
    reasoning = [d for d in deltas if "reasoning_content" in d]
    assert all(d["reasoning"] == d["reasoning_content"] for d in reasoning)
    assert "".join(d["reasoning_content"] for d in reasoning) == "Need the weather."
    assert "".join(d.get("content") or "" for d in deltas) == "Checking."
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    first, rest = calls[0], calls[1:]
    assert first["index"] == 0 and first["id"].startswith("call_") and first["type"] == "function"
    assert first["function"] == {"name": "get_weather", "arguments": ""}
    assert rest and all(set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"} for tc in rest)
    assert json.loads("".join(tc["function"]["arguments"] for tc in rest)) == {"city": "Paris", "days": 3}
    finish = [c["choices"][0]["finish_reason"] for c in cs if c["choices"]]
    assert finish[-1] == "tool_calls" and not any(finish[:-1])
    assert cs[-1]["choices"] == [] and cs[-1]["usage"]["completion_tokens"] > 0  # include_usage's own chunk
    assert cs[-1]["usage"]["completion_tokens_details"]["reasoning_tokens"] == 5  # "Need the weather." + </think>
    assert all(c["usage"] is None for c in cs[:-1])


def test_zero_argument_and_parallel_calls(server):
    deltas = [c["choices"][0]["delta"] for c in raw_stream(
        server, {"messages": user("SCRIPT:zero"), "tools": TOOLS, "stream": True}) if c["choices"]]
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"] == {"name": "now", "arguments": ""}
    assert "".join(tc["function"]["arguments"] for tc in calls) == "{}"  # Cline drops calls with no arguments
    calls = [tc for c in raw_stream(server, {"messages": user("SCRIPT:two"), "tools": TOOLS, "stream": True})
             if c["choices"] for tc in c["choices"][0]["delta"].get("tool_calls", [])]
    heads = [tc for tc in calls if "id" in tc]
    assert [h["index"] for h in heads] == [0, 1] and heads[0]["id"] != heads[1]["id"]
    for i, city in enumerate(["Paris", "Rome"]):
        assert json.loads("".join(tc["function"]["arguments"] for tc in calls if tc["index"] == i)) == {"city": city}


@pytest.mark.parametrize("name", ["tool", "zero", "two", "plain", "long"])
def test_streaming_equals_non_streaming(client, name):
    kw = dict(model="glm-4.7", messages=user(f"SCRIPT:{name}"), tools=TOOLS, seed=7, max_tokens=2000)
    whole = client.chat.completions.create(**kw)
    parts = {"reasoning": "", "content": "", "calls": {}}
    reason = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            d = ch.delta
            parts["reasoning"] += getattr(d, "reasoning_content", None) or ""
            parts["content"] += d.content or ""
            for tc in d.tool_calls or []:
                call = parts["calls"].setdefault(tc.index, {"name": tc.function.name, "arguments": ""})
                call["arguments"] += tc.function.arguments or ""
            reason = ch.finish_reason or reason
    msg = whole.choices[0].message
    assert parts["reasoning"] == (msg.model_extra["reasoning_content"] or "")
    assert parts["content"] == (msg.content or "")
    assert list(parts["calls"].values()) == [{"name": c.function.name, "arguments": c.function.arguments}
                                             for c in msg.tool_calls or []]
    assert reason == whole.choices[0].finish_reason


def test_a_zero_argument_call_has_empty_object_arguments_when_whole(client):
    out = client.chat.completions.create(model="glm-4.7", messages=user("SCRIPT:zero"), tools=TOOLS)
    (call,) = out.choices[0].message.tool_calls
    assert (call.function.name, call.function.arguments) == ("now", "{}")
    assert out.choices[0].finish_reason == "tool_calls"


def test_max_tokens_ends_the_reply_with_length(client):
    out = client.chat.completions.create(model="glm-4.7", messages=user("SCRIPT:plain"), max_tokens=3)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 3
    out = client.chat.completions.create(model="glm-4.7", messages=user("SCRIPT:plain"), max_completion_tokens=2)
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 2
    stream = list(client.chat.completions.create(model="glm-4.7", messages=user("SCRIPT:plain"), max_tokens=3,
                                                 stream=True))
    assert [c.choices[0].finish_reason for c in stream] == [None] * (len(stream) - 1) + ["length"]
    assert stream[-1].usage.completion_tokens == 3  # Z.ai-style: usage on the last chunk, no include_usage


def test_the_sdks_stream_helper_assembles_calls_without_duplicates(client):
    with client.chat.completions.stream(model="glm-4.7", messages=user("SCRIPT:tool"), tools=TOOLS) as stream:
        final = stream.get_final_completion()
    msg = final.choices[0].message
    assert final.choices[0].finish_reason == "tool_calls" and msg.role == "assistant" and msg.content == "Checking."
    (call,) = msg.tool_calls
    assert call.id.startswith("call_") and call.id.count("call_") == 1 and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}


def test_tool_call_round_trip_feeds_reasoning_and_result_back(server, client):
    _, engine, tok = server
    first = client.chat.completions.create(model="glm-4.7", messages=user("SCRIPT:tool"), tools=TOOLS)
    msg = first.choices[0].message
    assert first.choices[0].finish_reason == "tool_calls" and msg.model_extra["reasoning_content"] == "Need the weather."
    history = user("SCRIPT:tool") + [
        {"role": "assistant", "content": msg.content, "reasoning_content": msg.model_extra["reasoning_content"],
         "tool_calls": [c.model_dump() for c in msg.tool_calls]},
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": '{"sky": "sunny"}'}]
    second = client.chat.completions.create(model="glm-4.7", messages=history, tools=TOOLS)
    assert second.choices[0].message.content == AFTER_TOOL.split("</think>")[1]
    assert second.choices[0].finish_reason == "stop"
    prompt = tok.decode(engine.prompts[-1])
    # Interleaved thinking: the reasoning of the current tool loop goes back into the prompt.
    assert ("<think>Need the weather.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key><arg_value>"
            "Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call><|observation|>"
            '<tool_response>{"sky": "sunny"}</tool_response><|assistant|><think>') in prompt


@pytest.mark.parametrize("extra", [{"chat_template_kwargs": {"enable_thinking": False}},
                                   {"thinking": {"type": "disabled"}}, {"reasoning_effort": "none"}])
def test_thinking_off_starts_the_reply_in_content(server, client, extra):
    _, engine, tok = server
    out = client.chat.completions.create(model="glm-4.7", messages=user("hi"), extra_body=extra)
    assert tok.decode(engine.prompts[-1]).endswith("<|assistant|></think>")
    msg = out.choices[0].message
    assert msg.content == "Plain answer." and msg.model_extra["reasoning_content"] is None


def test_stop_string_n_and_logprobs(client):
    out = client.chat.completions.create(model="glm-alias", messages=user("SCRIPT:stop"), stop=["###"])
    assert out.model == "glm-alias" and out.choices[0].message.content == "one two "
    assert out.choices[0].finish_reason == "stop"
    out = client.chat.completions.create(model="glm-4.7", messages=user("SCRIPT:plain"), n=2, seed=1,
                                         logprobs=True, top_logprobs=2)
    assert [c.index for c in out.choices] == [0, 1] and out.usage.completion_tokens % 2 == 0
    for c in out.choices:
        assert c.message.content == "The answer is 4."
        assert len(c.logprobs.content) == out.usage.completion_tokens // 2
        assert all(len(t.top_logprobs) == 3 and t.logprob == -0.25 for t in c.logprobs.content)
    seen = {0: 0, 1: 0}
    for chunk in client.chat.completions.create(model="glm-4.7", messages=user("SCRIPT:plain"), n=2, stream=True,
                                                logprobs=True):
        for c in chunk.choices:
            seen[c.index] += len(c.logprobs.content) if c.logprobs else 0
    assert seen[0] == seen[1] == out.usage.completion_tokens // 2  # every token's logprob, exactly once


def test_completions_tokenize_and_detokenize(server, client):
    out = client.completions.create(model="glm-4.7", prompt=["SCRIPT:plain", "SCRIPT:stop"], max_tokens=3,
                                    echo=True, logprobs=1)
    assert [c.index for c in out.choices] == [0, 1] and all(c.finish_reason == "length" for c in out.choices)
    assert out.choices[0].text.startswith("SCRIPT:plain") and len(out.choices[0].logprobs.tokens) == 3
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="glm-4.7", prompt="SCRIPT:plain", max_tokens=50, stream=True))
    assert text == "Easy: 2+2.</think>The answer is 4."  # raw text: no reasoning split for plain completions
    headers = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(server[0] + "/tokenize", headers=headers, json={"messages": user("hello")})
    tokens = r.json()["tokens"]
    assert r.json()["count"] == len(tokens) and r.json()["max_model_len"] == 4096
    r = httpx.post(server[0] + "/detokenize", headers=headers, json={"tokens": tokens})
    assert r.json()["prompt"] == "[gMASK]<sop><|user|>hello<|assistant|><think>"


def test_models_health_and_metrics(server, client):
    assert [m.id for m in client.models.list()] == ["glm-4.7", "glm-alias"]
    assert httpx.get(server[0] + "/health").json() == {"status": "ok"}  # no key needed
    assert "glm47:generation_tokens_total" in httpx.get(server[0] + "/metrics").text
    assert httpx.head(server[0] + "/").status_code == 200


@pytest.mark.parametrize("body, status, param, words", [
    ({"messages": user("x"), "max_tokens": -1}, 400, "max_tokens", "max_tokens must be >= 1"),
    ({"messages": user("x"), "max_completion_tokens": 0}, 400, "max_completion_tokens",
     "max_completion_tokens must be >= 1"),
    ({"messages": user("x"), "max_tokens": 10**6}, 400, "max_tokens", "maximum context length is 4096"),
    ({"messages": user("x"), "max_completion_tokens": 10**6}, 400, "max_completion_tokens",
     "max_completion_tokens can be at most"),
    ({"messages": user("x " * 5000), "max_tokens": 5}, 400, "messages", "in the messages, 5 in the completion"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]", "unknown role"),
    ({"messages": "hello"}, 400, "messages", "valid array"),
    ({"messages": user("x"), "tool_choice": "required", "tools": TOOLS}, 400, "tool_choice", "not supported"),
    ({"model": "gpt-5", "messages": user("x")}, 404, "model", "does not exist"),
])
def test_errors_have_the_openai_body(server, body, status, param, words):
    r = httpx.post(server[0] + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    err = r.json()["error"]
    assert r.status_code == status and err["param"] == param and words in err["message"], r.text
    assert set(err) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("method, path, body, status", [
    ("POST", "/v1/chat/completions", b"{oops", 400),
    ("POST", "/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', 400),
    ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": 100000}', 400),
    ("POST", "/v1/chat/completions", b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404),
    ("GET", "/v1/models/nope", None, 404),
    ("POST", "/v1/nothing-here", b"{}", 404),
    ("GET", "/v1/chat/completions", None, 405),
])
def test_every_error_has_the_openai_body_shape(server, method, path, body, status):
    r = httpx.request(method, server[0] + path, content=body, headers={**AUTH, "content-type": "application/json"})
    assert r.status_code == status and set(r.json()) == {"error"}, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["type"], err


def test_errors_through_the_official_client(server, client):
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|maximum context length"):
        client.chat.completions.create(model="glm-4.7", messages=user("x " * 5000))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=user("x"))
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="glm-4.7", messages=user("x"))
    r = httpx.post(server[0] + "/v1/chat/completions", content=b"{oops", headers={"x-api-key": KEY})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_thin_client_streams_parsed_deltas(server):
    c = ServerClient(server[0], api_key=KEY)
    assert c.models()[0] == "glm-4.7"
    pieces = list(c.chat_stream(user("SCRIPT:tool"), TOOLS, max_tokens=100))
    assert "".join(p.delta.reasoning_content or "" for p in pieces if p.delta) == "Need the weather."
    assert pieces[-1].finish_reason == "tool_calls" and pieces[-1].delta is None
    heads = [tc for p in pieces if p.delta and p.delta.tool_calls for tc in p.delta.tool_calls if tc.id]
    assert [h.name for h in heads] == ["get_weather"]
    assert c.chat(user("hi"), enable_thinking=False)["choices"][0]["message"]["content"] == "Plain answer."
    with pytest.raises(ServerError, match="401"):
        ServerClient(server[0], api_key="wrong").chat(user("hi"))
