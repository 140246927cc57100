"""ServerConfig (what `glm47 serve` sets) and ServerContext, what every route shares: the async engine,
tokenizer, metrics and config, plus the steps the OpenAI, Anthropic and Responses endpoints have in common (model-name
check, prompt rendering off the event loop, submission with errors mapped to HTTP answers)."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field

from glm47.chat import PromptTooLong, Tokenizer, render_ids
from glm47.sampling_params import ContextTooLong, SamplingParams, context_overflow
from glm47.server.async_engine import AsyncEngine, EngineDead, EngineOverloaded, RequestHandle
from glm47.server.metrics import Metrics
from glm47.server.protocol import ApiError, bad_request, params_error

MIB = 2**20


@dataclass(slots=True)
class ServerConfig:
    served_model_names: list[str] = field(default_factory=lambda: ["glm-4.7"])  # the first is reported
    api_key: str | None = None  # when set, /v1/* and /tokenize need it (x-api-key or Authorization: Bearer)
    max_request_bytes: int = 32 * MIB  # larger bodies get 413; a 200K-token conversation is ~1 MB
    max_num_requests: int = 1024  # engine requests (samples) queued or running; more get 503
    # Default for requests that don't say; False keeps every turn's reasoning (Z.ai's coding endpoint).
    clear_thinking: bool = True
    keepalive_seconds: float = 10.0  # streams send a keep-alive at least this often (long prefills, held calls)
    retry_after_seconds: int = 1
    # HTTP hygiene (glm47/server/http.py): a request's headers must arrive within header_timeout_seconds of
    # its first byte (or of the connection), its body within body_timeout_seconds of the headers; a
    # keep-alive connection idle this long after a response is closed; connections beyond max_connections
    # get 503.
    header_timeout_seconds: float = 15.0
    body_timeout_seconds: float = 60.0
    idle_timeout_seconds: float = 5.0
    max_connections: int = 4096
    # Host names a request may be addressed to ("*": any). None: serve() picks the loopback names when it
    # binds loopback without an API key (so that a web page cannot reach it by DNS rebinding), else any.
    allowed_hosts: frozenset[str] | None = None
    # Prompts are rendered and tokenized off the event loop, this many at once.
    max_concurrent_tokenize: int = 2

    def __post_init__(self) -> None:
        if not self.served_model_names or not all(isinstance(n, str) and n for n in self.served_model_names):
            raise ValueError(f"served_model_names must be non-empty names, got {self.served_model_names!r}")
        for name in ("max_request_bytes", "max_num_requests", "max_connections", "max_concurrent_tokenize",
                     "header_timeout_seconds", "body_timeout_seconds", "idle_timeout_seconds"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")


class ServerContext:
    def __init__(self, engine, tokenizer: Tokenizer, config: ServerConfig):
        """engine: an LLMEngine or anything with its interface (see AsyncEngine)."""
        self.config = config
        self.tokenizer = tokenizer
        self.metrics = Metrics(config.served_model_names[0])
        self.engine = AsyncEngine(engine, tokenizer, self.metrics, config.max_num_requests)
        self.max_model_len: int = engine.max_model_len
        # A request must fit the context and the KV pool (a lone request never waits for more blocks).
        self.limit = min(engine.max_model_len, getattr(engine, "pool_tokens", engine.max_model_len))
        self.think_end_id = tokenizer.think_end_id
        self.created = int(time.time())
        tokenizer.max_token_bytes  # computed now rather than by the first request
        self._tokenizing = asyncio.Semaphore(config.max_concurrent_tokenize)

    @property
    def model(self) -> str:
        return self.config.served_model_names[0]

    def model_name(self, requested: str | None) -> str:
        """The name to answer with; 404 for a model this server does not serve (none given: the default)."""
        if not requested:
            return self.model
        if requested in self.config.served_model_names:
            return requested
        raise ApiError(404, f"The model `{requested}` does not exist.", "model", "model_not_found")

    async def render_chat(self, messages: list[dict], tools: list[dict] | None, enable_thinking: bool,
                          clear_thinking: bool, add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids, rendered and tokenized in a worker thread (the tokenizer releases the GIL on long
        texts), a few at a time. ContextTooLong, before tokenizing, when the text cannot fit the context."""
        try:
            return await self.off_loop(render_ids, self.tokenizer, messages, tools, enable_thinking=enable_thinking,
                                       clear_thinking=clear_thinking, add_generation_prompt=add_generation_prompt,
                                       max_tokens=self.limit)
        except PromptTooLong as e:
            raise ContextTooLong(e.num_tokens, None, self.limit, e.field, lower_bound=True) from None
        except ValueError as e:  # glm47.chat names the place: "messages[3].tool_calls[0]: ..."
            where = re.match(r"(messages|tools)(\[\d+\])?[\w.\[\]]*", str(e))
            raise bad_request(str(e), where.group(0) if where else "messages") from None

    async def encode(self, text: str) -> list[int]:
        """A raw prompt's ids (GLM's special tokens recognised), as render_chat: off the loop, bounded first."""
        least = len(text) // self.tokenizer.max_token_bytes
        if least > self.limit:
            raise ContextTooLong(least, None, self.limit, "prompt", lower_bound=True)
        return await self.off_loop(self.tokenizer.encode, text, allow_special=True)

    def check_context(self, num_prompt_tokens: int, max_tokens: int | None, prompt_field: str = "messages",
                      max_tokens_field: str = "max_tokens") -> None:
        """ContextTooLong (app.py words it as the route's API does) unless the prompt and max_tokens fit."""
        if error := context_overflow(num_prompt_tokens, max_tokens, self.limit, prompt_field, max_tokens_field):
            raise error

    async def off_loop(self, fn, *args, **kwargs):
        async with self._tokenizing:
            return await asyncio.to_thread(fn, *args, **kwargs)

    async def submit(self, prefix: str, samples: list[tuple[list[int], SamplingParams]]) -> RequestHandle:
        try:
            return await self.engine.submit(f"{prefix}-{uuid.uuid4().hex[:8]}", samples)
        except ValueError as e:  # the engine's own admission checks
            raise params_error(e) from None
        except EngineOverloaded as e:
            raise ApiError(503, f"the server is busy ({e}); retry later", code="overloaded",
                           headers={"Retry-After": str(self.config.retry_after_seconds)}) from None
        except EngineDead as e:
            raise ApiError(503, f"the engine is not running: {e}", code="engine_dead") from None


def new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"
