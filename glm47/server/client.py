"""A thin client for a running `glm47 serve` (standard library only: no torch, no FastAPI), for `glm47 chat
--url`. chat_stream() yields RemoteChunk(delta, finish_reason), the same fields as LLM.chat_stream's
ChatChunk, so a caller can drive a local LLM or a remote server alike. Errors raise ServerError."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

from glm47.parsers import Delta, ToolCallDelta


class ServerError(Exception):
    def __init__(self, status: int | None, message: str):
        super().__init__(f"{status}: {message}" if status else message)
        self.status, self.message = status, message


@dataclass(slots=True)
class RemoteChunk:
    delta: Delta | None  # one piece: reasoning, content or a tool-call fragment
    finish_reason: str | None = None  # set on the last chunk


class ServerClient:
    def __init__(self, url: str = "http://127.0.0.1:8000", api_key: str | None = None, model: str | None = None,
                 timeout: float = 600.0):
        self.url, self.api_key, self.model, self.timeout = url.rstrip("/"), api_key, model, timeout

    def models(self) -> list[str]:
        with self._open("GET", "/v1/models") as r:
            return [m["id"] for m in json.load(r)["data"]]

    def chat(self, messages: list[dict], tools: list[dict] | None = None, **options) -> dict:
        """The whole OpenAI chat completion. options: any request field (max_tokens, temperature, seed,
        thinking, ...); enable_thinking / clear_thinking go through chat_template_kwargs."""
        with self._open("POST", "/v1/chat/completions", self._body(messages, tools, False, options)) as r:
            return json.load(r)

    def chat_stream(self, messages: list[dict], tools: list[dict] | None = None, **options) -> Iterator[RemoteChunk]:
        """The reply as parsed pieces while it is generated; the last chunk carries the finish reason."""
        with self._open("POST", "/v1/chat/completions", self._body(messages, tools, True, options)) as r:
            for raw in r:
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.startswith("data:"):
                    continue  # blank separators and keep-alive comments
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ServerError(None, chunk["error"].get("message", str(chunk["error"])))
                for choice in chunk.get("choices") or ():
                    delta = _delta(choice.get("delta") or {})
                    if delta is not None:
                        yield RemoteChunk(delta)
                    if choice.get("finish_reason"):
                        yield RemoteChunk(None, choice["finish_reason"])

    def _body(self, messages, tools, stream: bool, options: dict) -> dict:
        body = {"model": self.model, "messages": messages, "stream": stream}
        if tools:
            body["tools"] = tools
        kwargs = {k: options.pop(k) for k in ("enable_thinking", "clear_thinking") if k in options}
        if kwargs:
            body["chat_template_kwargs"] = kwargs
        body.update(options)
        return {k: v for k, v in body.items() if v is not None}

    def _open(self, method: str, path: str, body: dict | None = None):
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            return urllib.request.urlopen(request, timeout=self.timeout)
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = e.reason
            raise ServerError(e.code, message) from None
        except urllib.error.URLError as e:
            raise ServerError(None, f"cannot reach {self.url}: {e.reason}") from None


def _delta(d: dict) -> Delta | None:
    if d.get("reasoning_content") or d.get("reasoning"):
        return Delta(reasoning_content=d.get("reasoning_content") or d["reasoning"])
    if d.get("content"):
        return Delta(content=d["content"])
    if d.get("tool_calls"):
        calls = [ToolCallDelta(c["index"], c.get("id"), (c.get("function") or {}).get("name"),
                               (c.get("function") or {}).get("arguments") or "") for c in d["tool_calls"]]
        return Delta(tool_calls=calls)
    return None
