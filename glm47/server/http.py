"""HTTP hygiene below the routes: what uvicorn does not bound by itself.

- `guarded_h11(header_timeout, max_connections)`: uvicorn's h11 protocol, plus a deadline for a request's
  headers (a connection that sends nothing, or drips its headers a byte at a time, is closed after
  `header_timeout` s: uvicorn only times out idle keep-alive connections after a response) and a cap on open
  connections (the one over the cap gets a 503 and is closed before it costs anything).
- `Guard`: ASGI middleware for every request: the body-size limit (413), a deadline for the whole body (408),
  for a server without an API key the checks that keep a web page from driving it (a JSON Content-Type,
  else 415; a loopback Host, else 403), one log line for a client that hangs up mid-upload, and memory given
  back to the OS after a large body (glibc keeps freed heap pages otherwise).
- `raise_open_files_limit`: the soft RLIMIT_NOFILE up to the hard one, so max_connections can be reached.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from glm47.server.protocol import ApiError

log = logging.getLogger("glm47.server")

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
TRIM_AFTER_BYTES = 1 << 20  # bodies from this size on give their memory back when the request ends

# An answer given before the body was read closes the connection: the rest of the body is never read.
_CLOSE = {"Connection": "close"}
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
         b"connection: close\r\ncontent-length: %d\r\n\r\n%s")
_BUSY_BODY = (b'{"error":{"message":"too many open connections; retry later","type":"overloaded_error",'
              b'"param":null,"code":"overloaded"}}')


def guarded_h11(header_timeout: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol class with a header deadline and a connection cap (uvicorn.Config(http=...))."""

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _warned = [0.0]  # when the cap was last logged (once a minute at most), shared by all connections

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                self.connections.discard(self)
                transport.write(_BUSY % (len(_BUSY_BODY), _BUSY_BODY))
                transport.close()
                if time.monotonic() - self._warned[0] > 60:
                    self._warned[0] = time.monotonic()
                    log.warning("%d connections open (the limit): new ones get 503", max_connections)
                return
            self._arm()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # Headers complete (or the request sent): the deadline is over. Still waiting for the headers of a
            # request that has begun: keep the deadline that runs (dripping bytes does not extend it).
            if self.conn.their_state is not h11.IDLE:
                self._disarm()
            elif self._deadline is None and not self.transport.is_closing():
                self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()  # arms uvicorn's keep-alive timeout for the next request
            self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._deadline = self.loop.call_later(header_timeout, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return GuardedH11Protocol


class Guard:
    """ASGI middleware; see the module docstring. allowed_hosts None: any Host header."""

    def __init__(self, app, max_bytes: int, body_timeout: float, require_json: bool,
                 allowed_hosts: frozenset[str] | None, error_response):
        self.app, self.max_bytes, self.body_timeout = app, max_bytes, body_timeout
        self.require_json, self.allowed_hosts, self.error_response = require_json, allowed_hosts, error_response
        self._trim = _malloc_trim()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        error = self._check(scope, headers)
        if error is not None:
            return await self.error_response(scope["path"], error)(scope, receive, send)
        deadline = time.monotonic() + self.body_timeout
        seen, done = 0, False

        async def guarded_receive():
            nonlocal seen, done
            if done:  # the body is in: what comes now is a disconnect, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise ApiError(408, f"the request body did not arrive within {self.body_timeout:g} s",
                               headers=_CLOSE) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                done = not message.get("more_body", False)
                if seen > self.max_bytes:  # inside the handler's body read: the exception handlers answer
                    raise ApiError(413, f"the request body is larger than the limit of {self.max_bytes} bytes",
                                   headers=_CLOSE)
            elif message["type"] == "http.disconnect":
                done = True
                if seen or headers.get(b"content-length", b"0") != b"0":
                    log.info("%s %s: the client hung up during the upload", scope["method"], scope["path"])
            return message

        try:
            await self.app(scope, guarded_receive, send)
        finally:
            if seen >= TRIM_AFTER_BYTES and self._trim is not None:
                await asyncio.to_thread(self._trim, 0)

    def _check(self, scope, headers: dict[bytes, bytes]) -> ApiError | None:
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return ApiError(413, f"the request body is larger than the limit of {self.max_bytes} bytes")
        hosts = self.allowed_hosts
        if hosts is not None and "*" not in hosts and _hostname(headers.get(b"host", b"")) not in hosts:
            return ApiError(403, f"this server answers only requests addressed to {', '.join(sorted(hosts))} "
                                 "(Host header; glm47 serve --allowed-hosts)")
        if self.require_json and scope["method"] == "POST":
            media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if media != b"application/json":
                return ApiError(415, "send the body with Content-Type: application/json (a server without an "
                                     "API key accepts nothing else, so that a web page cannot drive it)")
        return None


def _hostname(host: bytes) -> str:
    """The name in a Host header: 'localhost:8000' -> 'localhost', '[::1]:8000' -> '::1'."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def _malloc_trim():
    """glibc's malloc_trim (returns freed heap memory to the OS), or None elsewhere."""
    name = ctypes.util.find_library("c")
    try:
        return ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        return None


def raise_open_files_limit() -> int:
    """Raises the soft limit on open files to the hard one (a server holds a socket per client); returns it."""
    try:
        import resource
    except ImportError:  # not on POSIX
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft
