"""Limits and failure paths, with a slow scripted engine on a real socket: body size 413, full queue 503 with
Retry-After, a client disconnect aborting its request (metrics back to 0), SSE keep-alives while nothing is
generated, and an engine crash answered as an error event and a failing /health (never a traceback)."""

import contextlib

import httpx
import openai
import pytest
from server_util import chunks, running, running_and_kv, script, sse_messages, wait_idle

from glm47.server.app import create_app
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

LIMIT = 20_000


@pytest.fixture(scope="module")
def slow(tok):
    engine = ScriptedEngine(tok, script, step_delay=0.02)
    config = ServerConfig(max_num_requests=2, max_request_bytes=LIMIT, keepalive_seconds=0.1, retry_after_seconds=2)
    with running(create_app(engine, tok, config)) as url:
        yield url, engine


def long_stream_body(**extra) -> dict:
    return {"messages": [{"role": "user", "content": "SCRIPT:long"}], "stream": True, **extra}


def test_bodies_over_the_limit_get_413(slow):
    url = slow[0]
    big = {"messages": [{"role": "user", "content": "x" * LIMIT}]}
    r = httpx.post(url + "/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["type"] == "request_too_large"
    r = httpx.post(url + "/v1/messages", json={**big, "model": "glm-4.7", "max_tokens": 5})
    assert r.status_code == 413 and r.json()["type"] == "error"

    def chunked():  # no Content-Length: the limit is enforced while the body arrives
        for _ in range(2 * LIMIT // 1000):
            yield b" " * 1000

    r = httpx.post(url + "/v1/chat/completions", content=chunked(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than the limit" in r.json()["error"]["message"]


def test_disconnect_mid_stream_aborts_and_frees_the_kv_cache(slow):
    url, engine = slow
    with httpx.stream("POST", url + "/v1/chat/completions", json=long_stream_body()) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert running_and_kv(url)[0] == 1.0 and running_and_kv(url)[1] > 0
    assert wait_idle(url, 1.0) == (0.0, 0.0)
    assert not engine.has_unfinished()
    ant = {"model": "glm-4.7", "max_tokens": 1000, "messages": [{"role": "user", "content": "SCRIPT:long"}],
           "stream": True}
    with httpx.stream("POST", url + "/v1/messages", json=ant) as r:
        next(r.iter_lines())
    assert wait_idle(url, 1.0) == (0.0, 0.0)


def test_a_full_queue_answers_503_with_retry_after(slow):
    url, engine = slow
    with contextlib.ExitStack() as held:
        # Keep each line iterator referenced: a dropped one is closed by the garbage collector, and httpcore
        # closes the connection on that GeneratorExit, so the server (rightly) aborts the request.
        lines = [held.enter_context(httpx.stream("POST", url + "/v1/chat/completions", json=long_stream_body()))
                 .iter_lines() for _ in range(2)]
        for it in lines:
            next(it)  # both running: the limit (2) is reached
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.headers["retry-after"] == "2" and r.json()["error"]["code"] == "overloaded"
        r = httpx.post(url + "/v1/messages", json={"model": "glm-4.7", "max_tokens": 5,
                                                   "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 529 and r.headers["retry-after"] == "2"  # Anthropic's "overloaded"
        assert r.json()["error"]["type"] == "overloaded_error"
    assert wait_idle(url, 1.0) == (0.0, 0.0)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200  # capacity is back once the held requests are gone


def test_keep_alives_flow_while_nothing_is_generated(slow):
    url, engine = slow
    engine.step_delay = 0.35  # slower than the 0.1 s keep-alive interval
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "SCRIPT:plain"}], "stream": True, "max_tokens": 3}) as r:
            lines = list(r.iter_lines())
        assert ": keep-alive" in lines
        assert chunks(lines)[-1]["choices"][0]["finish_reason"] == "length"
        with httpx.stream("POST", url + "/v1/messages", json={
                "model": "glm-4.7", "max_tokens": 2, "stream": True,
                "messages": [{"role": "user", "content": "SCRIPT:plain"}]}) as r:
            events = [e for e, _ in sse_messages(r.iter_lines())]
        assert events.count("ping") > 1 and events[-1] == "message_stop"
    finally:
        engine.step_delay = 0.02


class CrashingEngine(ScriptedEngine):
    def step(self):
        raise RuntimeError("simulated engine bug")


def test_an_engine_crash_is_an_error_event_not_a_traceback(tok):
    with running(create_app(CrashingEngine(tok, script), tok, ServerConfig())) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.APIError, match="the engine failed"):
            for _ in client.chat.completions.create(model="glm-4.7", stream=True,
                                                    messages=[{"role": "user", "content": "hi"}]):
                pass
        health = httpx.get(url + "/health")  # no internal error text: that is in the log
        assert health.status_code == 503 and health.json() == {"status": "error", "message": "the engine failed"}
        r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and "Traceback" not in r.text and r.json()["error"]["code"] == "engine_dead"
