"""AsyncEngine: one thread owns the (not thread-safe) engine; asyncio handlers talk to it through queues.

Handlers `submit` samples (prompt ids + SamplingParams) and get a RequestHandle whose asyncio queue receives
each step's TextDelta; the engine thread makes every engine call through a TextDriver (glm47/text: add,
step, abort; detokenizing and stop strings), and hands deltas to the event loop with call_soon_threadsafe.
Parsing reasoning and tool calls is the handlers' job. A bounded number of requests may be in flight.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from glm47.chat import Tokenizer
from glm47.sampling_params import SamplingParams
from glm47.server.metrics import Metrics
from glm47.text import TextDelta, TextDriver

log = logging.getLogger("glm47.server")


class EngineOverloaded(Exception):
    """Too many requests in flight: the caller should answer 503 with Retry-After."""


class GenerationError(Exception):
    """A request's generation ended in an error; `status` and `code` are what the HTTP answer says."""
    status, code = 500, "generation_failed"


class EngineDead(GenerationError):
    """The engine thread stopped (an engine error or shutdown): no request can be served."""
    status, code = 503, "engine_dead"


class RequestFailed(GenerationError):
    """Stepping this one request raised (the engine goes on with the others)."""


@dataclass(slots=True)
class _Live:
    """Engine-thread state of one engine request, besides its text (the TextDriver's)."""
    handle: RequestHandle
    arrival: float
    last: float | None = None  # when the previous tokens came (None: no token yet)


@dataclass(slots=True)
class RequestHandle:
    """One submission (n samples) as seen by its handler: iterate with next(), stop it with abort()."""
    request_ids: list[str]
    num_prompt_tokens: list[int]
    _engine: AsyncEngine
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _open: int = 0  # samples not finished yet

    @property
    def finished(self) -> bool:
        return self._open == 0

    async def next(self, timeout: float | None = None) -> TextDelta | None:
        """The next delta of any sample (its index: the sample's place in the submission), None once every
        sample finished. Raises TimeoutError after
        `timeout` seconds without one, EngineDead if the engine stopped."""
        if self.finished and self._queue.empty():
            return None
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def abort(self) -> None:
        """Stops every unfinished sample and frees its KV blocks (a no-op once all finished)."""
        if not self.finished:
            self._engine._send(("abort", self.request_ids))


class AsyncEngine:
    def __init__(self, engine, tokenizer: Tokenizer, metrics: Metrics, max_num_requests: int = 1024):
        """engine: an LLMEngine or anything with its interface (add_request, step, abort, has_unfinished,
        stats, eos_token_ids). max_num_requests: engine requests (samples) queued or running at once."""
        self.engine = engine
        self.text = TextDriver(engine, tokenizer)  # engine thread only
        self.metrics = metrics
        self.max_num_requests = max_num_requests
        self.num_requests = 0  # samples in flight (event-loop side count)
        self.dead: str | None = None  # why the engine thread stopped, in words fit for a client
        self.failed = False  # it stopped on an error (not a shutdown)
        self.on_failure = None  # called (from the engine thread) once when it stops on an error
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._live: dict[str, _Live] = {}  # engine thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # ---- event-loop side ----------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="glm47-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Aborts whatever is still running and stops the engine thread."""
        if self._thread is not None and self._thread.is_alive():
            self._send(("stop",))
            await asyncio.to_thread(self._thread.join)

    async def submit(self, request_id: str, samples: list[tuple[list[int], SamplingParams]]) -> RequestHandle:
        """Adds one engine request per sample; all or none. Raises ValueError (the engine rejected one),
        RequestFailed, EngineOverloaded or EngineDead."""
        if self.dead:
            raise EngineDead(self.dead)
        self.check_fits(len(samples))
        if self.num_requests + len(samples) > self.max_num_requests:
            raise EngineOverloaded(f"{self.num_requests} requests in flight (limit {self.max_num_requests})")
        ids = [f"{request_id}-{k}" for k in range(len(samples))]
        handle = RequestHandle(ids, [len(p) for p, _ in samples], self, _open=len(samples))
        done = self._loop.create_future()
        self.num_requests += len(samples)
        self._send(("add", handle, samples, done))
        try:
            error = await asyncio.shield(done)
        except asyncio.CancelledError:  # the client went away while we waited: don't leave orphans behind
            self._send(("abort", ids))
            raise
        if error is not None:
            raise error
        return handle

    def check_fits(self, num_samples: int) -> None:
        """ValueError for a submission of more samples than can ever be in flight at once (no retry helps)."""
        if num_samples > self.max_num_requests:
            raise ValueError(f"this request needs {num_samples} sequences (prompts x n), more than the "
                             f"{self.max_num_requests} this server runs at once")

    def _send(self, command: tuple) -> None:
        self._commands.put(command)

    def _deliver(self, items: list[tuple[RequestHandle, TextDelta | BaseException]]) -> None:
        for handle, item in items:
            if isinstance(item, BaseException) or item.finish_reason is not None:
                handle._open -= 1
                self.num_requests -= 1
            handle._queue.put_nowait(item)

    def _added(self, handle: RequestHandle, done: asyncio.Future, error: Exception | None) -> None:
        if error is not None:  # counted here, not in submit(): its caller may be gone (cancelled)
            self.num_requests -= len(handle.request_ids)
            handle._open = 0
        if not done.done():
            done.set_result(error)

    def _call_soon(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed (interpreter shutdown): nobody is listening
            pass

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        stopping = False
        while not stopping:
            # Idle: sleep until a command comes. Busy: take what is there and step.
            try:
                command = self._commands.get(block=not engine.has_unfinished())
            except queue.Empty:
                command = None
            out: list[tuple[RequestHandle, TextDelta | BaseException]] = []
            while command is not None:
                stopping |= self._command(command, out)
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    command = None
            if stopping:
                self._abort([rid for rid in self._live], out)
            try:
                if engine.has_unfinished():
                    self._step(out)
                self.metrics.engine_stats(engine.stats())
            except Exception:  # an engine bug (not one request's): fail every request instead of hanging them
                log.exception("engine step failed; the server can no longer generate")
                self.dead, self.failed = "the engine failed (the server log says why); the server is stopping", True
                out += [(live.handle, EngineDead(self.dead)) for live in self._live.values()]
                self._live.clear()
                stopping = True
            if out:
                self._call_soon(self._deliver, out)
        if not self.dead:
            self.dead = "the server is shutting down"
        if self.failed and self.on_failure is not None:
            self.on_failure()

    def _command(self, command: tuple, out: list) -> bool:
        kind = command[0]
        if kind == "add":
            _, handle, samples, done = command
            self._call_soon(self._added, handle, done, self._add(handle, samples))
        elif kind == "abort":
            self._abort(command[1], out)
        return kind == "stop"

    def _add(self, handle: RequestHandle, samples) -> Exception | None:
        """None, or why the submission was refused: the engine's ValueError (a 400), or RequestFailed."""
        now = time.monotonic()
        added = []
        for k, ((prompt, params), rid) in enumerate(zip(samples, handle.request_ids)):
            try:
                self.text.add(prompt, params, index=k, request_id=rid)
            except Exception as e:
                for r in added:  # all or none: a half-added submission would never be read
                    self.text.abort(r)
                    del self._live[r]
                if isinstance(e, ValueError):
                    return e
                log.exception("adding request %s failed", rid)
                return RequestFailed(f"the request could not be added: {type(e).__name__}: {e}")
            added.append(rid)
            self._live[rid] = _Live(handle, now)
            self.metrics.prompt_tokens.inc(len(prompt))
        return None

    def _abort(self, request_ids: list[str], out: list) -> None:
        for rid in request_ids:
            live = self._live.pop(rid, None)
            if live is not None:
                out.append((live.handle, self.text.abort(rid)))  # its blocks are freed now
                self.metrics.request_finished("abort")

    def _step(self, out: list) -> None:
        outputs = self.engine.step()
        now = time.monotonic()
        for o in outputs:
            live = self._live.get(o.request_id)
            if live is None:  # aborted or ended by a stop string already
                continue
            try:
                d = self.text.feed(o)
                if d.finish_reason == "error":
                    raise RequestFailed(o.error)
                self._delivered(o.request_id, d, live, now, out)
            except Exception as e:  # this request's own failure: it ends with an error, the others go on
                if not isinstance(e, RequestFailed):
                    log.exception("request %s failed", o.request_id)
                    e = RequestFailed(f"{type(e).__name__}: {e}")
                    self.text.abort(o.request_id)
                self._live.pop(o.request_id, None)
                self.metrics.request_finished("error")
                out.append((live.handle, e))

    def _delivered(self, request_id: str, d: TextDelta, live: _Live, now: float, out: list) -> None:
        m = self.metrics
        if d.token_ids:
            m.generation_tokens.inc(len(d.token_ids))
            if live.last is None:
                m.time_to_first_token.observe(now - live.arrival)
            else:
                m.inter_token_latency.observe(now - live.last)
            live.last = now
        if d.finish_reason is not None:
            del self._live[request_id]
            m.e2e_request_latency.observe(now - live.arrival)
            m.request_finished(d.finish_reason)
        out.append((live.handle, d))
