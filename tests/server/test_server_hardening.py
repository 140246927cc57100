"""One request must never take the server down. Through the real server on a real socket: values that once
killed the engine answer 400 and the next request is served; a request whose sampling raises fails alone;
malformed JSON (lone surrogates, deep nesting, huge numbers) and loose types are 400s in each API's body; lists
are bounded; a large body does not stall /health; tool calls cut by max_tokens reach no client as calls;
statuses say what is true (never-fits 400, engine failure 503 and the server exits 1)."""

from __future__ import annotations

import gc
import json
import threading
import time

import httpx
import openai
import psutil
import pytest
import torch
from server_util import TOOLS, chunks, free_port, running, script, sse_messages, wait_idle

import glm47.engine.llm_engine as llm_engine_module
from glm47.engine.llm_engine import LLMEngine
from glm47.server.app import create_app, serve
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

CHAT, COMPLETIONS, MESSAGES = "/v1/chat/completions", "/v1/completions", "/v1/messages"
VOCAB = 151552  # tiny-glm47 has GLM-4.7's vocabulary


@pytest.fixture(scope="module")
def real(tiny_glm47, tok):
    """The real engine on a tiny random checkpoint: what once raised inside its step must now be refused."""
    path = tiny_glm47
    engine = LLMEngine.from_path(path, dtype=torch.float32, kv_cache_tokens=2048, max_model_len=512)
    with running(create_app(engine, tok, ServerConfig())) as url:
        yield url, engine


def user(text: str = "hi") -> list[dict]:
    return [{"role": "user", "content": text}]


def body_for(path: str, **fields) -> dict:
    base = {CHAT: {"messages": user()}, COMPLETIONS: {"prompt": "Hello"},
            MESSAGES: {"model": "glm-4.7", "messages": user()}}[path]
    return {**base, "max_tokens": 2, **fields}


def served_ok(url: str, path: str = CHAT) -> bool:
    return httpx.post(url + path, json=body_for(path), timeout=30).status_code == 200


# ---- 1. values that reached the engine's step ----------------------------------------------------------
ENGINE_KILLERS = [  # (path, fields, the field the 400 names)
    (CHAT, {"top_k": 2**63}, "top_k"), (COMPLETIONS, {"top_k": 2**63}, "top_k"), (MESSAGES, {"top_k": 2**63}, "top_k"),
    (CHAT, {"top_k": -2}, "top_k"), (CHAT, {"top_k": VOCAB + 1}, "top_k"),
    (CHAT, {"stop_token_ids": [99999999], "min_tokens": 2}, "stop_token_ids"),
    (COMPLETIONS, {"stop_token_ids": [VOCAB], "min_tokens": 1}, "stop_token_ids"),
    (CHAT, {"stop_token_ids": [-1]}, "stop_token_ids"),
    (CHAT, {"logit_bias": {str(VOCAB): 5}}, "logit_bias"),
    (CHAT, {"logit_bias": {"1": 1e300}}, "logit_bias"),
    (CHAT, {"seed": 2**64}, "seed"), (CHAT, {"seed": -(2**63) - 1}, "seed"),
    (CHAT, {"n": 129}, "n"), (COMPLETIONS, {"n": 10**20}, "n"),
    (CHAT, {"min_tokens": 3}, "min_tokens"),  # more than max_tokens=2
    (CHAT, {"max_tokens": 0}, "max_tokens"), (CHAT, {"max_tokens": 10**30}, "max_tokens"),
    (MESSAGES, {"max_tokens": 10**30}, "max_tokens"),
    (CHAT, {"temperature": -1}, "temperature"), (MESSAGES, {"temperature": -1}, "temperature"),
    (CHAT, {"top_p": 0}, "top_p"), (MESSAGES, {"top_p": 2}, "top_p"), (CHAT, {"min_p": 2}, "min_p"),
    (CHAT, {"presence_penalty": 5}, "presence_penalty"), (CHAT, {"repetition_penalty": 0}, "repetition_penalty"),
    (CHAT, {"frequency_penalty": 1e308}, "frequency_penalty"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"), (COMPLETIONS, {"logprobs": 10**6}, "logprobs"),
    (COMPLETIONS, {"prompt": [VOCAB]}, None), (COMPLETIONS, {"prompt": [-1]}, None),
    (COMPLETIONS, {"prompt": [[1, 2], [3, 10**12]]}, None),
]


@pytest.mark.parametrize("path, fields, param", ENGINE_KILLERS,
                         ids=[f"{p.rsplit('/', 1)[1]}-{next(iter(f))}" for p, f, _ in ENGINE_KILLERS])
def test_values_that_reached_the_engine_step_answer_400_and_the_next_request_is_served(real, path, fields, param):
    url, engine = real
    r = httpx.post(url + path, json=body_for(path, **fields), timeout=30)
    assert r.status_code == 400, r.text
    if path == MESSAGES:
        assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
    elif param is not None:
        assert r.json()["error"]["param"] == param, r.text
    assert len(r.content) < 2000  # the message does not echo the request back
    assert served_ok(url, path) and httpx.get(url + "/health").status_code == 200


def test_the_largest_seed_with_n_samples_is_served(real):
    r = httpx.post(real[0] + CHAT, json=body_for(CHAT, seed=2**64 - 1, n=2), timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


def test_a_request_whose_sampling_raises_fails_alone(real, monkeypatch):
    url, engine = real
    poisoned = 4242
    sample = llm_engine_module.sample

    def faulty(logits, params, *args, **kwargs):  # a fault injected into one request's sampling
        if any(p.seed == poisoned for p in params):
            raise RuntimeError("injected sampling fault")
        return sample(logits, params, *args, **kwargs)

    monkeypatch.setattr(llm_engine_module, "sample", faulty)
    healthy = {"messages": user("Tell me a story"), "max_tokens": 60, "ignore_eos": True, "temperature": 0,
               "stream": True}
    with httpx.stream("POST", url + CHAT, json=healthy, timeout=60) as stream:
        lines = stream.iter_lines()
        first = [next(lines) for _ in range(4)]  # running: the poisoned request joins its batch
        bad = httpx.post(url + CHAT, json=body_for(CHAT, seed=poisoned, max_tokens=20), timeout=30)
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "generation_failed"
        assert "injected sampling fault" in bad.json()["error"]["message"]
        with httpx.stream("POST", url + MESSAGES, timeout=30, json={
                **body_for(MESSAGES, max_tokens=20), "stream": True, "temperature": 0.5}) as bad_stream:
            pass  # (no seed in the Anthropic API: this one is healthy and streamed beside the others)
        assert bad_stream.status_code == 200
        rest = list(lines)
    got = chunks(first + rest)
    assert got[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["delta"].get("content") or c["choices"][0]["delta"].get("reasoning_content")
                   or "") > 0 for c in got) > 0
    streamed_bad = httpx.post(url + CHAT, json={**body_for(CHAT, seed=poisoned, max_tokens=5), "stream": True})
    assert '"error"' in streamed_bad.text and "injected sampling fault" in streamed_bad.text
    assert httpx.get(url + "/health").json() == {"status": "ok"} and served_ok(url)
    assert wait_idle(url, 2.0) == (0.0, 0.0)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


# ---- 3. malformed JSON and loose types: 400 in each API's own body, on every route ----------------------
ROUTES = [CHAT, COMPLETIONS, MESSAGES, "/v1/messages/count_tokens", "/tokenize", "/detokenize",
          "/api/paas/v4/chat/completions"]
BAD_JSON = {
    "lone surrogate": b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "prompt": "\\udc00"}',
    "nested 10,000 deep": b'{"x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "a 5,000-digit integer": b'{"max_tokens": ' + b"9" * 5000 + b"}",
    "invalid UTF-8": b'{"prompt": "\xff\xfe"}',
    "not an object": b"[1, 2, 3]",
    "truncated": b'{"messages": [',
}


@pytest.mark.parametrize("path", ROUTES)
@pytest.mark.parametrize("what", list(BAD_JSON))
def test_malformed_json_is_a_400_in_the_apis_own_body(real, path, what):
    r = httpx.post(real[0] + path, content=BAD_JSON[what], headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    body = r.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    else:
        assert body["error"]["type"] == "invalid_request_error" and body["error"]["message"]


@pytest.mark.parametrize("path, fields", [
    (CHAT, {"max_tokens": "10"}), (CHAT, {"stream": "yes"}), (CHAT, {"n": 2.0}), (CHAT, {"temperature": "0.5"}),
    (COMPLETIONS, {"prompt": [True, 5]}), (COMPLETIONS, {"prompt": [[1, True]]}), ("/detokenize", {"tokens": [True]}),
    (MESSAGES, {"max_tokens": "10"}), (MESSAGES, {"stream": 1}), (CHAT, {"stream_options": {"include_usage": "y"}}),
])
def test_strings_and_booleans_are_not_coerced_into_numbers_or_flags(real, path, fields):
    base = {} if path == "/detokenize" else body_for(path)
    r = httpx.post(real[0] + path, json={**base, **fields})
    assert r.status_code == 400, r.text


# ---- 2. bounded work per request --------------------------------------------------------------------------
def test_huge_lists_are_refused_before_any_work(real):
    url = real[0]
    for path, field, value in [
            (CHAT, "stop", [f"s{i}" for i in range(50_000)]), (COMPLETIONS, "stop", ["x" * 5000]),
            (MESSAGES, "stop_sequences", [f"s{i}" for i in range(50_000)]),
            (CHAT, "stop_token_ids", list(range(5000))), (CHAT, "logit_bias", {str(i): 1 for i in range(5000)}),
            (CHAT, "tools", TOOLS * 300), (MESSAGES, "tools", [{"name": "t", "input_schema": {}}] * 600)]:
        r = httpx.post(url + path, json=body_for(path, **{field: value}), timeout=30)
        assert r.status_code == 400, (path, field, r.text[:300])
        assert field in r.text and len(r.content) < 2000
    assert served_ok(url)


@pytest.mark.slow
def test_a_12_mb_body_does_not_delay_health(tok):
    """Its prompt is rendered and tokenized in a worker thread that releases the GIL."""
    engine = ScriptedEngine(tok, script, max_model_len=10**6)  # the text could fit: it is really tokenized
    with running(create_app(engine, tok, ServerConfig())) as url:
        assert served_ok(url)
        body = json.dumps({"messages": user("hello world, some text. " * 500_000), "max_tokens": 5})  # 12 MB
        rss = psutil.Process().memory_info().rss
        result = {}
        worker = threading.Thread(target=lambda: result.update(r=httpx.post(
            url + CHAT, content=body, headers={"content-type": "application/json"}, timeout=120)), daemon=True)
        worst, polls = 0.0, 0
        worker.start()
        while worker.is_alive():
            t = time.perf_counter()
            assert httpx.get(url + "/health", timeout=10).status_code == 200
            worst, polls = max(worst, time.perf_counter() - t), polls + 1
            time.sleep(0.05)
        assert result["r"].status_code == 400 and "maximum context length" in result["r"].text
        assert polls >= 5 and worst < 0.5, (polls, worst)
        result.clear()
        gc.collect()
        # its ~1 GB of tokenizer and parser memory goes back to the OS once the request has ended, just after
        # its answer was sent (glibc would keep it: +900 MB)
        deadline = time.monotonic() + 10
        while psutil.Process().memory_info().rss > rss + 300 * 2**20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert psutil.Process().memory_info().rss < rss + 300 * 2**20
        # A raw prompt that cannot fit is refused by its length before it is tokenized
        short = ScriptedEngine(tok, script)
        assert short.max_model_len * tok.max_token_bytes < 12_000_000
    with running(create_app(short, tok, ServerConfig())) as url:
        t = time.perf_counter()
        r = httpx.post(url + COMPLETIONS, json={"prompt": "word " * 2_400_000, "max_tokens": 5}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert time.perf_counter() - t < 2.0


# ---- 5. a tool call cut by max_tokens is no call (OpenAI chat, Z.ai's path, Anthropic, Responses) ---------
CALL = "Need it.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris, France</arg_value>"\
       "</tool_call>"


def _cut_tokens(tok) -> int:
    """max_tokens that ends the scripted reply inside the call's argument value."""
    ids = tok.encode(CALL, allow_special=True)
    return next(k for k in range(len(ids)) if tok.decode(ids[:k]).endswith("Paris"))


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_tool_call_cut_by_max_tokens_reaches_no_client_as_a_call(tok, stream):
    cut = _cut_tokens(tok)
    with running(create_app(ScriptedEngine(tok, CALL), tok, ServerConfig())) as url:
        oai = {"messages": user(), "tools": TOOLS, "max_tokens": cut, "stream": stream}
        for path in (CHAT, "/api/coding/paas/v4/chat/completions"):
            r = httpx.post(url + path, json=oai, timeout=30)
            if stream:
                got = chunks(r.text.splitlines())
                assert not any("tool_calls" in c["choices"][0]["delta"] for c in got if c["choices"])
                content = "".join(c["choices"][0]["delta"].get("content") or "" for c in got if c["choices"])
                reason = next(c["choices"][0]["finish_reason"] for c in got if c["choices"] and
                              c["choices"][0]["finish_reason"])
            else:
                message = r.json()["choices"][0]["message"]
                assert "tool_calls" not in message
                content, reason = message["content"], r.json()["choices"][0]["finish_reason"]
            assert reason == "length" and content == "Checking.<tool_call>get_weather<arg_key>city</arg_key>" \
                                                     "<arg_value>Paris", content
        ant = {"model": "glm-4.7", "messages": user(), "max_tokens": cut, "stream": stream,
               "tools": [{"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}]}
        r = httpx.post(url + MESSAGES, json=ant, timeout=30)
        if stream:
            events = [(e, json.loads(d)) for e, d in sse_messages(r.text.splitlines())]
            starts = [d["content_block"]["type"] for e, d in events if e == "content_block_start"]
            assert "tool_use" not in starts and events[-2][1]["delta"]["stop_reason"] == "max_tokens"
            text = "".join(d["delta"].get("text", "") for e, d in events if e == "content_block_delta")
        else:
            blocks = r.json()["content"]
            assert [b["type"] for b in blocks] == ["thinking", "text"] and r.json()["stop_reason"] == "max_tokens"
            text = blocks[1]["text"]
        assert text.endswith("<arg_value>Paris")
        function = {"type": "function", "name": "get_weather", "parameters": TOOLS[0]["function"]["parameters"]}
        resp = {"model": "glm-4.7", "input": "weather?", "max_output_tokens": cut, "stream": stream,
                "tools": [function]}
        r = httpx.post(url + "/v1/responses", json=resp, timeout=30)
        if stream:
            events = [json.loads(d) for _, d in sse_messages(r.text.splitlines())]
            assert not any(e["type"].startswith("response.function_call") for e in events)
            final = events[-1]["response"]
            assert events[-1]["type"] == "response.incomplete"
        else:
            final = r.json()
        assert [o["type"] for o in final["output"]] == ["reasoning", "message"] and final["status"] == "incomplete"
        assert final["output"][1]["content"][0]["text"].endswith("<arg_value>Paris")
        # The same reply with room for the whole call is a call
        whole = httpx.post(url + CHAT, json={**oai, "max_tokens": 100, "stream": False}).json()["choices"][0]
        assert whole["finish_reason"] == "tool_calls"
        assert json.loads(whole["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris, France"}


# ---- 6. statuses ----------------------------------------------------------------------------------------------
def test_a_request_that_can_never_fit_is_400_not_busy(tok):
    with running(create_app(ScriptedEngine(tok, script), tok, ServerConfig(max_num_requests=8))) as url:
        r = httpx.post(url + COMPLETIONS, json={"prompt": ["a"] * 9, "max_tokens": 2})
        assert r.status_code == 400 and "retry-after" not in r.headers and "more than the 8" in r.text
        r = httpx.post(url + COMPLETIONS, json={"prompt": ["a"] * 3, "n": 3, "max_tokens": 2})
        assert r.status_code == 400
        r = httpx.post(url + CHAT, json={"messages": user(), "n": 9, "max_tokens": 2})
        assert r.status_code == 400 and "more than the 8" in r.text
        assert httpx.post(url + COMPLETIONS, json={"prompt": ["a"] * 4, "n": 2, "max_tokens": 2}).status_code == 200


class CrashingEngine(ScriptedEngine):
    """Runs two steps, then fails the way an engine bug would."""
    steps = 0

    def step(self):
        self.steps += 1
        if self.steps > 2:
            raise RuntimeError("simulated engine bug")
        return super().step()


def test_after_an_engine_failure_every_generation_route_is_503(tok):
    engine = CrashingEngine(tok, SCRIPT_LONG, step_delay=0.01)
    with running(create_app(engine, tok, ServerConfig())) as url:
        r = httpx.post(url + CHAT, json={"messages": user(), "max_tokens": 50})  # in flight when it fails
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert "simulated" not in r.text  # the traceback and its text are in the log only
        for path in (CHAT, COMPLETIONS, MESSAGES):
            r = httpx.post(url + path, json=body_for(path))
            assert r.status_code == 503, (path, r.text)
        assert httpx.get(url + "/health").status_code == 503


SCRIPT_LONG = "word " * 200


def test_serve_exits_with_status_1_when_the_engine_fails(tok):
    port, result = free_port(), {}
    engine = CrashingEngine(tok, SCRIPT_LONG, step_delay=0.01)
    thread = threading.Thread(target=lambda: result.update(code=serve(
        engine, tok, ServerConfig(), port=port, log_level="warning")), daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(url + "/health")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="the engine failed"):
            for _ in client.chat.completions.create(model="glm-4.7", stream=True, messages=user()):
                pass
        thread.join(30)
    finally:
        if thread.is_alive():  # the test failed early: a request the engine fails on stops the server
            engine.steps = 10
            try:
                httpx.post(url + CHAT, json=body_for(CHAT), timeout=5)
            except httpx.HTTPError:
                pass
            thread.join(30)
    assert not thread.is_alive() and result["code"] == 1
