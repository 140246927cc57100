"""LLM: the offline Python API. Loads a checkpoint (weights, tokenizer, stop ids), runs the engine through a
TextDriver (glm47/text: detokenizing, stop strings), and does the rest of the text work the engine does not:
prompt rendering, `n` samples, and parsing reasoning / tool calls out of chat replies.

    llm = LLM("path/to/checkpoint")
    out = llm.generate(["Hello"], SamplingParams(max_tokens=32))[0]          # out.text, out.token_ids
    msg = llm.chat([{"role": "user", "content": "2+2?"}])                   # msg.reasoning_content, msg.content
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from glm47.chat import Tokenizer, render_ids, render_prompt
from glm47.engine.llm_engine import LLMEngine
from glm47.parsers import Delta, OutputStream, ToolCall, parse_output, prompt_ends_in_think
from glm47.sampling_params import SamplingParams
from glm47.text import CompletionOutput, TextDelta, TextDriver, chat_finish_reason


@dataclass(slots=True)
class RequestOutput:
    index: int  # position in the prompts given to generate()
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    # with SamplingParams.prompt_logprobs: each prompt token's logprob (None for the first) and top alternatives
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None

    # The first sample, for the common n = 1 case.
    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)


@dataclass(slots=True)
class ChatOutput:
    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str | None  # 'stop' | 'length' | 'tool_calls' | 'abort'
    text: str  # the raw completion text the parts came from
    num_prompt_tokens: int = 0
    num_completion_tokens: int = 0


@dataclass(slots=True)
class ChatChunk:
    delta: Delta | None  # one parsed piece (reasoning, content or a tool-call fragment)
    finish_reason: str | None = None  # set on the last chunk


class LLM:
    def __init__(self, model_path: str | Path, dtype: torch.dtype | str = "bfloat16", device: str = "cpu",
                 tokenizer: Tokenizer | None = None, **engine_options):
        """engine_options: EngineConfig fields (block_size, max_num_seqs, kv_cache_tokens, ...)."""
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype.removeprefix("torch."), None) if dtype else None
            if not isinstance(dtype, torch.dtype):
                raise ValueError("dtype must be bfloat16, float16 or float32")
        self.model_path = Path(model_path)
        self.engine = LLMEngine.from_path(model_path, dtype=dtype, device=device, **engine_options)
        self.tokenizer = tokenizer or Tokenizer.from_dir(model_path)

    # ---- plain completion ---------------------------------------------------------------------------
    def generate(self, prompts: str | list[str] | None = None,
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 prompt_token_ids: list[list[int]] | None = None) -> list[RequestOutput]:
        """Runs every prompt to completion; outputs are in prompt order."""
        texts, id_lists, params = self._inputs(prompts, sampling_params, prompt_token_ids)
        results = [RequestOutput(i, texts[i], id_lists[i], [CompletionOutput(k) for k in range(p.n)])
                   for i, p in enumerate(params)]
        for d in self._stream(id_lists, params):
            r = results[d.index]
            r.outputs[d.output_index].add(d)
            r.num_cached_tokens = max(r.num_cached_tokens, d.num_cached_tokens)
            if d.prompt_logprobs is not None:
                r.prompt_logprobs, r.prompt_top_logprobs = d.prompt_logprobs, d.prompt_top_logprobs
        return results

    def generate_stream(self, prompts: str | list[str] | None = None,
                        sampling_params: SamplingParams | list[SamplingParams] | None = None,
                        prompt_token_ids: list[list[int]] | None = None) -> Iterator[TextDelta]:
        """Yields what each engine step adds to each sample, as it happens."""
        _, id_lists, params = self._inputs(prompts, sampling_params, prompt_token_ids)
        yield from self._stream(id_lists, params)

    # ---- chat ---------------------------------------------------------------------------------------
    def chat(self, messages: list[dict], tools: list[dict] | None = None,
             sampling_params: SamplingParams | None = None, enable_thinking: bool = True,
             clear_thinking: bool = True) -> ChatOutput:
        """Renders the conversation, generates the assistant's reply and parses it."""
        ids, thinking = self._chat_prompt(messages, tools, enable_thinking, clear_thinking)
        params = sampling_params or self.default_chat_params()
        out = self.generate(prompt_token_ids=[ids], sampling_params=params)[0]
        parsed = parse_output(out.text, tools, thinking=thinking, finished=True)
        reason = chat_finish_reason(out.finish_reason, len(parsed.tool_calls))
        return ChatOutput(parsed.reasoning_content, parsed.content, parsed.tool_calls, reason, out.text,
                          len(ids), len(out.token_ids))

    def chat_stream(self, messages: list[dict], tools: list[dict] | None = None,
                    sampling_params: SamplingParams | None = None, enable_thinking: bool = True,
                    clear_thinking: bool = True) -> Iterator[ChatChunk]:
        """The reply as parsed pieces while it is generated; the last chunk carries the finish reason."""
        ids, thinking = self._chat_prompt(messages, tools, enable_thinking, clear_thinking)
        params = sampling_params or self.default_chat_params()
        parser = OutputStream(tools, thinking=thinking)
        reason = None
        for d in self._stream([ids], [params.for_sample(0)]):
            for delta in parser.feed(d.text):
                yield ChatChunk(delta)
            reason = d.finish_reason or reason
        for delta in parser.close():
            yield ChatChunk(delta)
        yield ChatChunk(None, chat_finish_reason(reason, parser.num_tool_calls))

    def default_chat_params(self) -> SamplingParams:
        """GLM-4.7's recommended sampling, with room for a reply."""
        return SamplingParams.recommended(max_tokens=1024)

    # ---- internals ----------------------------------------------------------------------------------
    def _chat_prompt(self, messages, tools, enable_thinking, clear_thinking) -> tuple[list[int], bool]:
        kw = dict(enable_thinking=enable_thinking, clear_thinking=clear_thinking)
        ids = render_ids(self.tokenizer, messages, tools, **kw)
        # Whether the reply starts inside <think> is read off the prompt the model is shown.
        return ids, prompt_ends_in_think(render_prompt(messages, tools, **kw))

    def _inputs(self, prompts, sampling_params, prompt_token_ids):
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of prompts or prompt_token_ids")
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("prompts must be strings (use prompt_token_ids for token ids)")
            id_lists = [self.tokenizer.encode(t) for t in texts]
        else:
            id_lists = [list(p) for p in prompt_token_ids]
            texts = [None] * len(id_lists)
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(id_lists):
                raise ValueError(f"{len(sampling_params)} sampling_params for {len(id_lists)} prompts")
            params = sampling_params
        else:
            params = [sampling_params or SamplingParams()] * len(id_lists)
        return texts, id_lists, params

    def _stream(self, id_lists: list[list[int]], params: list[SamplingParams]) -> Iterator[TextDelta]:
        driver = TextDriver(self.engine, self.tokenizer)
        try:
            for i, (ids, p) in enumerate(zip(id_lists, params)):
                for k in range(p.n):  # n samples are n requests; the prefix cache shares their prompt blocks
                    driver.add(ids, p.for_sample(k), i, k)
            while driver:
                yield from driver.step()
        finally:
            driver.abort_all()  # the caller stopped early, or an error: free the engine's blocks
