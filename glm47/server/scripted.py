"""ScriptedEngine: a stand-in for LLMEngine that replays a fixed completion text as tokens (one per step,
then a stop token). A random-weight test model never writes reasoning or tool calls; with this, tests (and
client developers) see exactly what the server sends for them. It has the engine's interface and admission
checks, not its batching or KV cache (usage is counted in tokens)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from glm47.chat import EOS_TOKEN_IDS, Tokenizer
from glm47.engine.llm_engine import EngineStats, StepOutput
from glm47.sampling_params import SamplingParams

USER = 151336  # <|user|>: how GLM ends a turn that hands over to the user


@dataclass(slots=True)
class _Script:
    prompt: list[int]
    params: SamplingParams
    tokens: list[int]  # the reply, then the stop token
    pos: int = 0


class ScriptedEngine:
    def __init__(self, tokenizer: Tokenizer, reply: str | Callable[[str], str], max_model_len: int = 4096,
                 pool_tokens: int | None = None, step_delay: float = 0.0, stop_id: int = USER):
        """reply: the completion text (special tokens such as </think> or <tool_call> are parsed), or a
        function of the prompt text returning it. step_delay: seconds each step() sleeps, to act slow."""
        self.tokenizer, self.reply, self.step_delay, self.stop_id = tokenizer, reply, step_delay, stop_id
        self.eos_token_ids = frozenset(EOS_TOKEN_IDS)
        self.max_model_len = max_model_len
        self.pool_tokens = pool_tokens or max_model_len
        self.prompts: list[list[int]] = []  # every prompt added, for tests to inspect
        self._running: dict[str, _Script] = {}
        self._pending: list[StepOutput] = []
        self._count = 0

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None) -> str:
        params = params or SamplingParams()
        prompt = list(prompt_token_ids)
        if not prompt:
            raise ValueError("the prompt is empty: give at least one token id")
        limit = min(self.max_model_len, self.pool_tokens)
        if len(prompt) + (params.max_tokens or 1) > limit:
            raise ValueError(f"prompt of {len(prompt)} tokens + max_tokens={params.max_tokens} exceeds {limit}")
        self._count += 1
        request_id = request_id or str(self._count)
        if request_id in self._running:
            raise ValueError(f"request_id {request_id!r} is already in use")
        text = self.reply if isinstance(self.reply, str) else self.reply(self.tokenizer.decode(prompt))
        tokens = self.tokenizer.encode(text, allow_special=True) + [self.stop_id]
        self._running[request_id] = _Script(prompt, params, tokens)
        self.prompts.append(prompt)
        return request_id

    def abort(self, request_id: str) -> bool:
        if self._running.pop(request_id, None) is None:
            return False
        self._pending.append(StepOutput(request_id, [], True, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return bool(self._running or self._pending)

    def step(self) -> list[StepOutput]:
        if self.step_delay:
            time.sleep(self.step_delay)
        outputs, self._pending = self._pending, []
        for rid, s in list(self._running.items()):
            token = s.tokens[min(s.pos, len(s.tokens) - 1)]
            s.pos += 1
            stops = set(s.params.stop_token_ids or ()) | (set() if s.params.ignore_eos else self.eos_token_ids)
            reason = "stop" if token in stops else "length" if s.pos >= (s.params.max_tokens or 10**9) else None
            o = StepOutput(rid, [token], reason is not None, reason)
            if s.params.logprobs is not None:  # the scripted token is sure; alternatives are made up
                o.logprobs = [-0.25]
                o.top_logprobs = [[(token, -0.25)] + [(t, -3.0 - t) for t in range(s.params.logprobs)]]
            if reason:
                del self._running[rid]
            outputs.append(o)
        return outputs

    def stats(self) -> EngineStats:
        used = sum(len(s.prompt) + s.pos for s in self._running.values())
        blocks = -(-self.pool_tokens // 16)
        return EngineStats(len(self._running), 0, used / self.pool_tokens, blocks, blocks - -(-used // 16),
                           0, 0, 0, 0, 0, 0, 0)
