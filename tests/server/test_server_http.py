"""HTTP hygiene on a real socket (glm47/server/http.py): idle and half-sent connections are closed after
their timeouts (no slowloris), a body that stops arriving gets 408, connections over the cap get 503, a client
that hangs up mid-upload costs one log line and no traceback, and a server without an API key answers only
JSON bodies (415) addressed to the hosts it allows (403)."""

from __future__ import annotations

import logging
import socket
import time

import httpx
import pytest
from server_util import running, script

from glm47.server.app import create_app
from glm47.server.context import ServerConfig
from glm47.server.scripted import ScriptedEngine

CHAT = "/v1/chat/completions"
BODY = b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}'


@pytest.fixture(scope="module")
def strict(tok):
    config = ServerConfig(header_timeout_seconds=0.6, body_timeout_seconds=0.6, idle_timeout_seconds=0.6,
                          max_connections=400)
    with running(create_app(ScriptedEngine(tok, script), tok, config)) as url:
        yield url


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    s = socket.create_connection((host, int(port)))
    s.settimeout(5)
    return s


def closed_by_server(s: socket.socket) -> bool:
    """True once the server closed the connection (whatever it sent before is read and dropped), False if it
    is still open after 5 s."""
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_and_half_sent_connections_are_closed_after_their_timeouts(strict):
    url = strict
    idle = [connect(url) for _ in range(300)]
    dripping = [connect(url) for _ in range(20)]
    for s in dripping:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n")  # headers never end
    kept_alive = connect(url)  # one request answered, then the connection idles
    kept_alive.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert b"200 OK" in kept_alive.recv(4096)
    for _ in range(3):  # dripping a byte now and then does not extend the header deadline
        time.sleep(0.2)
        for s in dripping:
            s.sendall(b"X")
    start = time.monotonic()
    states = {name: [closed_by_server(s) for s in group] for name, group in
              (("idle", idle), ("dripping", dripping), ("kept alive", [kept_alive]))}
    assert all(all(v) for v in states.values()), {k: v.count(False) for k, v in states.items()}
    assert time.monotonic() - start < 3.0
    assert httpx.get(url + "/health").status_code == 200


def test_a_body_that_stops_arriving_gets_408_and_its_connection_closed(strict):
    s = connect(strict)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
              b"Content-Length: 500\r\n\r\n" + BODY[:20])
    reply = b""
    while data := s.recv(65536):  # to the end: the server closes it (the rest of the body is never read)
        reply += data
    assert reply.startswith(b"HTTP/1.1 408") and b"did not arrive within" in reply
    assert b"timeout_error" in reply


def test_connections_over_the_cap_get_503(tok):
    config = ServerConfig(max_connections=20)
    with running(create_app(ScriptedEngine(tok, script), tok, config)) as url:
        held = [connect(url) for _ in range(20)]
        for _ in range(50):  # once the server has taken all 20 (it may lag behind the client on a busy machine)
            extra = connect(url)
            extra.settimeout(0.2)
            try:
                reply = extra.recv(4096)
                break
            except TimeoutError:  # taken: not all of the others were yet
                extra.close()
        assert reply.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in reply.lower()
        for s in held:
            s.close()
        time.sleep(0.2)
        assert httpx.post(url + CHAT, content=BODY, headers={"content-type": "application/json"}).status_code == 200


def test_a_client_hanging_up_mid_upload_logs_one_line(strict, caplog):
    with caplog.at_level(logging.INFO):
        s = connect(strict)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100000\r\n\r\n" + b'{"messages": [' + b" " * 5000)
        time.sleep(0.2)
        s.close()
        deadline = time.monotonic() + 5
        while not any("hung up" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # anything else it would log (a traceback) comes with it
    records = [r for r in caplog.records if r.levelno >= logging.INFO and r.name.startswith(("glm47", "uvicorn"))]
    assert [r.getMessage() for r in records] == ["POST /v1/chat/completions: the client hung up during the upload"]
    assert all(r.exc_info is None for r in caplog.records)
    assert httpx.get(strict + "/health").status_code == 200


def test_a_keyless_server_takes_only_json_bodies(tok):
    with running(create_app(ScriptedEngine(tok, script), tok, ServerConfig())) as url:
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data", None):
            headers = {"content-type": kind} if kind else {}
            r = httpx.post(url + CHAT, content=BODY, headers=headers)
            assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"]
            r = httpx.post(url + "/v1/messages", content=BODY, headers=headers)
            assert r.status_code == 415 and r.json()["type"] == "error"
        ok = httpx.post(url + CHAT, content=BODY, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 200
    keyed = ServerConfig(api_key="k")
    with running(create_app(ScriptedEngine(tok, script), tok, keyed)) as url:  # a key is the protection there
        r = httpx.post(url + CHAT, content=BODY, headers={"content-type": "text/plain", "x-api-key": "k"})
        assert r.status_code == 200


def test_a_loopback_server_answers_only_requests_addressed_to_loopback(tok):
    config = ServerConfig(allowed_hosts=frozenset({"localhost", "127.0.0.1", "::1"}))
    with running(create_app(ScriptedEngine(tok, script), tok, config)) as url:
        port = url.rsplit(":", 1)[1]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "localhost"):
            assert httpx.get(url + "/health", headers={"host": host}).status_code == 200, host
        for host in (f"evil.example:{port}", "attacker.com", f"localhost.evil.example:{port}"):
            r = httpx.post(url + CHAT, content=BODY, headers={"host": host, "content-type": "application/json"})
            assert r.status_code == 403 and "Host" in r.json()["error"]["message"], host
    with running(create_app(ScriptedEngine(tok, script), tok, ServerConfig(allowed_hosts=frozenset("*")))) as url:
        assert httpx.get(url + "/health", headers={"host": "proxy.example"}).status_code == 200
