"""SamplingParams: one request's decoding settings, validated when made; ParamError and ContextTooLong, the
errors that name the request field at fault (so a server answers with it without reading the message); and
GLM-4.7's recommended sampling. Stdlib only: a server, a thin client or a test imports it without torch.
The sampler that applies these settings to logits is glm47/engine/sampling.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from numbers import Integral, Real

# Temperatures below this count as greedy, as in vLLM: dividing by ~0 overflows logits to inf and softmax to NaN.
GREEDY_BELOW = 1e-5
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
# Bounds on the lists a request brings: the engine and the stop-string matcher do work per item every step, so
# one request with 100,000 stop strings would slow every other (OpenAI allows 4 stop strings and 300 biases).
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS = 1024
MAX_N = 128
# GLM-4.7's recommended sampling (model card; Z.ai API defaults): what a chat gets when it does not say.
RECOMMENDED_TEMPERATURE = 1.0
RECOMMENDED_TOP_P = 0.95


class ParamError(ValueError):
    """A request value out of range; `field` names it (a SamplingParams field, or "prompt"), so that a server can
    say which field of its request it was without reading the message."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class ContextTooLong(ParamError):
    """A request that cannot fit the context of `limit` tokens: a prompt of num_prompt_tokens tokens (more than
    that when `lower_bound`: it was counted before encoding) plus max_tokens (None: at least one). The fields are
    named as the request calls them; `field` is the one to shrink: the prompt when it alone fills the context,
    else max_tokens. Each API words it its own way (glm47/server: OpenAI's and Anthropic's wording)."""

    def __init__(self, num_prompt_tokens: int, max_tokens: int | None, limit: int, prompt_field: str = "prompt",
                 max_tokens_field: str = "max_tokens", lower_bound: bool = False):
        self.num_prompt_tokens, self.max_tokens, self.limit = num_prompt_tokens, max_tokens, limit
        self.prompt_field, self.max_tokens_field, self.lower_bound = prompt_field, max_tokens_field, lower_bound
        self.prompt_overflows = lower_bound or num_prompt_tokens >= limit
        more = "more than " if lower_bound else ""
        asked = "" if max_tokens is None or lower_bound else f" + {max_tokens_field}={max_tokens}"
        super().__init__(prompt_field if self.prompt_overflows else max_tokens_field,
                         f"a prompt of {more}{num_prompt_tokens} tokens{asked} exceeds the context of {limit} tokens")


def context_overflow(num_prompt_tokens: int, max_tokens: int | None, limit: int, prompt_field: str = "prompt",
                     max_tokens_field: str = "max_tokens") -> ContextTooLong | None:
    """ContextTooLong if the prompt and max_tokens (None: at least one token) exceed `limit`, else None."""
    if num_prompt_tokens + max(max_tokens or 1, 1) <= limit:
        return None
    return ContextTooLong(num_prompt_tokens, max_tokens, limit, prompt_field, max_tokens_field)


@dataclass(slots=True)
class SamplingParams:
    """One request's decoding settings. Defaults are vLLM's; recommended() gives GLM-4.7's recommended
    temperature and top_p, which chats get when they omit them. stop_token_ids=None means "the model's eos ids",
    which the engine resolves from generation_config."""

    temperature: float = 1.0  # 0 (or below GREEDY_BELOW) = greedy argmax
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context limit
    min_tokens: int = 0
    stop: list[str] | None = None  # a single str is accepted and becomes [str]
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None = off; 0 = sampled token only; k = plus the k most likely tokens
    # The same for the prompt: each prompt token's logprob given the tokens before it (the first has none), plus
    # the k most likely there. Such a request computes its whole prompt (no prefix-cache hits).
    prompt_logprobs: int | None = None
    n: int = 1
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # OpenAI's logit_bias: token id -> a bias in [-100, 100] added to its logit before sampling (greedy too);
    # -100 all but bans a token, +100 all but forces it.
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        for name, (kind, rule, ok) in _RULES.items():
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            value = kind(name, value)
            if not ok(value):
                raise ParamError(name, f"{name} must be {rule}, got {_short(value)}")
            setattr(self, name, value)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError("min_tokens", f"min_tokens={self.min_tokens} must be <= max_tokens={self.max_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None:
            self.stop = _list("stop", self.stop, MAX_STOP_STRINGS)
            if not all(isinstance(s, str) and s for s in self.stop):
                raise ParamError("stop", f"stop must be a list of non-empty strings, got {_short(self.stop)}")
            if any(len(s) > MAX_STOP_STRING_CHARS for s in self.stop):
                raise ParamError("stop", f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters long")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ParamError("logit_bias", f"logit_bias must be a mapping of token ids to biases, got "
                                               f"{_short(self.logit_bias)}")
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ParamError("logit_bias", f"logit_bias must have at most {MAX_LOGIT_BIAS} entries, got "
                                               f"{len(self.logit_bias)}")
            bias = {_int("logit_bias token id", t): _real("logit_bias value", v) for t, v in self.logit_bias.items()}
            bad = next(((t, v) for t, v in bias.items() if t < 0 or not -100 <= v <= 100), None)
            if bad is not None:
                raise ParamError("logit_bias", f"logit_bias must map token ids >= 0 to biases in [-100, 100], got "
                                               f"{bad[0]}: {bad[1]}")
            self.logit_bias = bias or None
        if self.stop_token_ids is not None:
            ids = _list("stop_token_ids", self.stop_token_ids, MAX_STOP_TOKEN_IDS)
            self.stop_token_ids = [_int("stop_token_ids", t) for t in ids]
            if any(t < 0 for t in self.stop_token_ids):
                raise ParamError("stop_token_ids", f"stop_token_ids must be token ids >= 0, got "
                                                   f"{_short(self.stop_token_ids)}")

    @classmethod
    def recommended(cls, **settings) -> SamplingParams:
        """GLM-4.7's recommended sampling (RECOMMENDED_TEMPERATURE, RECOMMENDED_TOP_P) with `settings` on top."""
        return cls(**{"temperature": RECOMMENDED_TEMPERATURE, "top_p": RECOMMENDED_TOP_P, **settings})

    def for_sample(self, k: int) -> SamplingParams:
        """The settings of sample k of n (n samples are n engine requests): n=1, and seed + k (kept within the
        64 bits a seed has), so that seeded samples differ from each other and each is reproducible."""
        seed = self.seed if self.seed is None or k == 0 else _wrap64(self.seed + k)
        return self if (self.n, seed) == (1, self.seed) else replace(self, n=1, seed=seed)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _wrap64(seed: int) -> int:
    """seed + k kept within the 64-bit seeds a generator takes (2**64 - 1 + 1 becomes 0)."""
    return seed - 2**64 if seed >= 2**64 else seed


def _real(name: str, value) -> float:
    # bool is an int subclass; temperature=True is a client bug, not 1.0
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ParamError(_field(name), f"{name} must be a finite number, got {_short(value)}")
    try:
        value = float(value)  # an integer of 400 digits overflows
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ParamError(_field(name), f"{name} must be a finite number, got {_short(value)}")
    return value


def _int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise ParamError(_field(name), f"{name} must be an integer, got {_short(value)}")
    return int(value)


def _list(name: str, value, max_len: int) -> list:
    if not isinstance(value, (list, tuple)):
        raise ParamError(name, f"{name} must be a list, got {_short(value)}")
    if len(value) > max_len:
        raise ParamError(name, f"{name} must have at most {max_len} items, got {len(value)}")
    return list(value)


def _field(name: str) -> str:
    return name.split(" ", 1)[0]  # "logit_bias token id" -> "logit_bias"


def _short(value, limit: int = 200) -> str:
    """repr() cut to `limit` characters: an error message must not echo a megabyte back."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise ParamError(name, f"{name} must be true or false, got {_short(value)}")
    return value


# field -> (type check, rule for the message, range check); the type check raises ValueError, never TypeError.
_RULES = {
    "temperature": (_real, ">= 0", lambda v: v >= 0),
    "top_p": (_real, "in (0, 1]", lambda v: 0 < v <= 1),
    # the engine also checks top_k against its vocabulary; this keeps it within a tensor's int64
    "top_k": (_int, "in [-1, 2**31) (0 or -1 = off)", lambda v: -1 <= v < 2**31),
    "min_p": (_real, "in [0, 1]", lambda v: 0 <= v <= 1),
    "repetition_penalty": (_real, "> 0", lambda v: v > 0),
    "presence_penalty": (_real, "in [-2, 2]", lambda v: -2 <= v <= 2),
    "frequency_penalty": (_real, "in [-2, 2]", lambda v: -2 <= v <= 2),
    # torch.Generator.manual_seed accepts exactly this range; outside it, it would raise RuntimeError later.
    "seed": (_int, "a 64-bit integer", lambda v: -(2**63) <= v < 2**64),
    "max_tokens": (_int, ">= 1", lambda v: v >= 1),
    "min_tokens": (_int, ">= 0", lambda v: v >= 0),
    "logprobs": (_int, f"in [0, {MAX_LOGPROBS}]", lambda v: 0 <= v <= MAX_LOGPROBS),
    "prompt_logprobs": (_int, f"in [0, {MAX_LOGPROBS}]", lambda v: 0 <= v <= MAX_LOGPROBS),
    "n": (_int, f"in [1, {MAX_N}]", lambda v: 1 <= v <= MAX_N),
    "ignore_eos": (_bool, "true or false", lambda v: True),
    "include_stop_str_in_output": (_bool, "true or false", lambda v: True),
    "skip_special_tokens": (_bool, "true or false", lambda v: True),
}
_OPTIONAL = {"seed", "max_tokens", "logprobs", "prompt_logprobs"}  # None is a meaningful value for these
