"""Helpers shared by the server tests (no tests here): a real uvicorn server on a free loopback port in a
thread, scripted replies picked by a `SCRIPT:name` marker in the prompt, an SSE reader, and /metrics probes."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time

import httpx
import uvicorn

from glm47.server.app import uvicorn_config

# What the scripted engine answers, by the marker found in the prompt. Written as GLM-4.7 writes: the prompt
# ends in <think>, so a reply starts inside the reasoning.
SCRIPTS = {
    "tool": "Need the weather.</think>Checking.<tool_call>get_weather<arg_key>city</arg_key>"
            "<arg_value>Paris</arg_value><arg_key>days</arg_key><arg_value>3</arg_value></tool_call>",
    "zero": "Time?</think><tool_call>now</tool_call>",
    "two": "Both.</think><tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>"
           "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Rome</arg_value></tool_call>",
    "plain": "Easy: 2+2.</think>The answer is 4.",
    "stop": "Counting.</think>one two ### three",
    "long": "Thinking. " * 200 + "</think>Done.",
}
AFTER_TOOL = "The tool answered.</think>It is sunny in Paris."
NO_THINKING = "Plain answer."

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]


def script(prompt: str) -> str:
    """The scripted engine's reply to a prompt (its text, special tokens spelled out)."""
    if prompt.endswith("</think>"):  # thinking switched off
        return NO_THINKING
    if "<tool_response>" in prompt:
        return AFTER_TOOL
    last_user = prompt.rsplit("<|user|>", 1)[-1]
    return next((text for name, text in SCRIPTS.items() if f"SCRIPT:{name}" in last_user), SCRIPTS["plain"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Serves `app` on a free loopback port (a real socket) for the duration; yields the base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn_config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def sse_messages(lines) -> list[tuple[str | None, str]]:
    """(event, data) of each SSE message in an iterator of text lines; comments are skipped."""
    out, event, data = [], None, []
    for line in lines:
        if line == "":
            if data:
                out.append((event, "\n".join(data)))
            event, data = None, []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        out.append((event, "\n".join(data)))
    return out


def chunks(lines) -> list[dict]:
    """The JSON chunks of an OpenAI stream; asserts it ends with [DONE]."""
    messages = sse_messages(lines)
    assert messages and messages[-1][1] == "[DONE]", messages[-3:]
    return [json.loads(data) for _, data in messages[:-1]]


def metric(text: str, name: str) -> float:
    """The value of an unlabelled-by-us Prometheus sample (first series of that name)."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def running_and_kv(url: str) -> tuple[float, float]:
    """(glm47:num_requests_running, glm47:kv_cache_usage_perc) as /metrics reports them now."""
    text = httpx.get(url + "/metrics").text
    return metric(text, "glm47:num_requests_running"), metric(text, "glm47:kv_cache_usage_perc")


def wait_idle(url: str, seconds: float) -> tuple[float, float]:
    """Polls /metrics until nothing runs and no KV block is held, for at most `seconds`; the last reading."""
    deadline = time.monotonic() + seconds
    while (state := running_and_kv(url)) != (0.0, 0.0) and time.monotonic() < deadline:
        time.sleep(0.02)
    return state
