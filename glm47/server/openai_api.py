"""OpenAI-compatible endpoints: /v1/chat/completions (also under Z.ai's /api/paas/v4 paths), /v1/models. Chat replies
carry `reasoning_content` (and its alias `reasoning`) next to `content`, and tool calls in OpenAI's streaming shape: one
delta per call, sent once the call has closed, with index, id, type, name and the whole arguments (a half-finished call
is never sent). Also /v1/completions (raw prompts) and vLLM's /tokenize and /detokenize."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from glm47.chat import Tokenizer
from glm47.parsers import Delta
from glm47.server.async_engine import GenerationError, RequestHandle
from glm47.server.context import ServerContext, new_id
from glm47.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                   TokenizeRequest, bad_request, body_schema, chat_messages, chat_tools,
                                   check_response_format, max_tokens_of, parse_body, samples,
                                   sampling_params, thinking_flags)
from glm47.server.streaming import DONE, KEEPALIVE, ChoiceState, abort_on_disconnect, outputs, sse, sse_response
from glm47.text import CompletionOutput

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> dict:
    ctx: ServerContext = request.app.state.ctx
    return {"object": "list", "data": [_model_card(ctx, name) for name in ctx.config.served_model_names]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict:
    ctx: ServerContext = request.app.state.ctx
    return _model_card(ctx, ctx.model_name(model))


def _model_card(ctx: ServerContext, name: str) -> dict:
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "glm47",
            "max_model_len": ctx.max_model_len}


_CHAT_BODY = body_schema(ChatCompletionRequest)


@router.post("/v1/chat/completions", openapi_extra=_CHAT_BODY)
@router.post("/api/paas/v4/chat/completions", openapi_extra=_CHAT_BODY)  # Z.ai's base URLs, so a Z.ai client
@router.post("/api/coding/paas/v4/chat/completions", openapi_extra=_CHAT_BODY)  # can point here as is
async def chat_completions(request: Request):
    ctx: ServerContext = request.app.state.ctx
    req: ChatCompletionRequest = parse_body(await request.body(), ChatCompletionRequest)
    model = ctx.model_name(req.model)
    messages = chat_messages(req.messages)
    tools = chat_tools(req.tools, req.tool_choice)
    check_response_format(req.response_format)
    enable_thinking, clear_thinking = thinking_flags(req, ctx.config.clear_thinking)
    if req.top_logprobs and not req.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens, max_tokens_field = max_tokens_of(req)
    params = sampling_params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, max_tokens_field,
                             "top_logprobs")
    prompt = await ctx.render_chat(messages, tools, enable_thinking, clear_thinking)
    ctx.check_context(len(prompt), max_tokens, "messages", max_tokens_field)
    handle = await ctx.submit("chatcmpl", samples(prompt, params, req.n))
    # Our renderer ends the prompt in <think> exactly when thinking is on, so the reply starts in reasoning.
    reply = ChatReply(ctx, handle, model, tools, enable_thinking, req.logprobs, req.include_usage)
    if req.stream:
        return sse_response(reply.stream())
    async with abort_on_disconnect(request, handle):
        return JSONResponse(await reply.whole())


class ChatReply:
    """The n choices of one chat request, answered whole or as a chunk stream."""

    def __init__(self, ctx: ServerContext, handle: RequestHandle, model: str, tools: list[dict] | None,
                 thinking: bool, logprobs: bool, include_usage: bool):
        self.ctx, self.handle, self.model = ctx, handle, model
        self.logprobs, self.include_usage = logprobs, include_usage
        self.id, self.created = new_id("chatcmpl-"), int(time.time())
        self.choices = [ChoiceState(tools, thinking) for _ in handle.request_ids]

    async def whole(self) -> dict:
        async for out in outputs(self.handle, self.ctx.config.keepalive_seconds):
            if out is not None:
                self.choices[out.index].feed(out)
        answers = []
        for i, st in enumerate(self.choices):
            parsed, reason = st.parsed()
            message = {"role": "assistant", "content": parsed.content,
                       "reasoning_content": parsed.reasoning_content, "reasoning": parsed.reasoning_content}
            if parsed.tool_calls:
                message["tool_calls"] = [_tool_call(c.id, c.name, c.arguments) for c in parsed.tool_calls]
            o = st.out
            lp = self._logprobs(o.token_ids, o.logprobs or [], o.top_logprobs or []) if self.logprobs else None
            answers.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "system_fingerprint": None, "choices": answers, "usage": self.usage()}

    async def stream(self) -> AsyncIterator[str]:
        try:
            for i in range(len(self.choices)):  # the role once per choice, first (clients concatenate it)
                yield self._chunk(i, {"role": "assistant", "content": ""})
            pending: dict[int, int] = {}  # choice -> index of its first token whose logprobs are unsent
            async for out in outputs(self.handle, self.ctx.config.keepalive_seconds):
                if out is None:
                    yield KEEPALIVE
                    continue
                st = self.choices[out.index]
                start = pending.get(out.index, len(st.out.token_ids))
                for delta in st.feed(out):
                    yield self._chunk(out.index, _delta_json(delta), self._take_logprobs(st, start))
                    start = len(st.out.token_ids)
                pending[out.index] = start
                if st.finished:
                    last = all(c.finished for c in self.choices)
                    usage = self.usage() if last and not self.include_usage else None  # Z.ai-style clients
                    yield self._chunk(out.index, {}, self._take_logprobs(st, start), st.stream_finish_reason,
                                      usage)
            if self.include_usage:
                yield sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                           "model": self.model, "choices": [], "usage": self.usage()})
            yield DONE
        except GenerationError as e:  # OpenAI's SDK raises on a data message with an "error" key
            yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            self.handle.abort()  # client gone (Starlette cancels us) or error: free the KV blocks

    def _chunk(self, index: int, delta: dict, logprobs: dict | None = None, finish_reason: str | None = None,
               usage: dict | None = None) -> str:
        chunk = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                 "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if usage is not None or self.include_usage:
            chunk["usage"] = usage
        return sse(chunk)

    def _take_logprobs(self, st: ChoiceState, start: int) -> dict | None:
        o = st.out
        if not self.logprobs or start >= len(o.logprobs or ()):
            return None
        return self._logprobs(o.token_ids[start:], o.logprobs[start:], o.top_logprobs[start:])

    def _logprobs(self, ids: list[int], logprobs: list[float], top: list[list[tuple[int, float]]]) -> dict:
        tok = self.ctx.tokenizer
        return {"content": [dict(_token_logprob(tok, i, lp), top_logprobs=[_token_logprob(tok, j, q) for j, q in t])
                            for i, lp, t in zip(ids, logprobs, top)], "refusal": None}

    def usage(self) -> dict:
        prompt = self.handle.num_prompt_tokens[0]
        completion = sum(len(c.out.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": self.choices[0].out.num_cached_tokens},
                "completion_tokens_details": {
                    "reasoning_tokens": sum(c.reasoning_tokens(self.ctx.think_end_id) for c in self.choices)}}


def _delta_json(d: Delta) -> dict:
    if d.reasoning_content is not None:  # Z.ai / DeepSeek name, and vLLM >= 0.17 / OpenRouter's alias
        return {"reasoning_content": d.reasoning_content, "reasoning": d.reasoning_content}
    if d.content is not None:
        return {"content": d.content}
    calls = []
    for c in d.tool_calls:
        if c.id is not None:  # a call's first delta; Splitter leaves out the type, OpenAI clients need it
            calls.append({"index": c.index, "id": c.id, "type": "function",
                          "function": {"name": c.name, "arguments": c.arguments}})
        else:
            calls.append({"index": c.index, "function": {"arguments": c.arguments}})
    return {"tool_calls": calls}


def _tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _token_logprob(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    raw = tokenizer.token_bytes(token_id)
    # OpenAI uses -9999.0 for "very unlikely"; JSON has no -inf.
    return {"token": raw.decode("utf-8", "replace"), "logprob": max(logprob, -9999.0), "bytes": list(raw)}


# ---- plain completions, tokenize ----------------------------------------------------------------------
@router.post("/v1/completions", openapi_extra=body_schema(CompletionRequest))
async def completions(request: Request):
    ctx: ServerContext = request.app.state.ctx
    req: CompletionRequest = parse_body(await request.body(), CompletionRequest)
    model = ctx.model_name(req.model)
    if req.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if req.best_of not in (None, req.n):
        raise bad_request("best_of is not supported (use n)", "best_of")
    prompts = await _prompt_ids(ctx, req.prompt, req.n)
    # OpenAI's default for completions is 16 tokens.
    params = sampling_params(req, 16 if req.max_tokens is None else req.max_tokens, req.logprobs)
    if req.echo and req.logprobs is not None:  # the echoed prompt gets logprobs too (lm-eval's loglikelihood)
        params = replace(params, prompt_logprobs=req.logprobs)
    work = []
    for p in prompts:
        ctx.check_context(len(p), params.max_tokens, "prompt")
        work += samples(p, params, req.n)
    handle = await ctx.submit("cmpl", work)
    reply = CompletionReply(ctx, handle, model, prompts, req)
    if req.stream:
        return sse_response(reply.stream())
    async with abort_on_disconnect(request, handle):
        return JSONResponse(await reply.whole())


async def _prompt_ids(ctx: ServerContext, prompt: str | list, n: int) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists (OpenAI's four forms), as
    lists of ids. Text is encoded with GLM's special tokens recognised: a raw prompt spells its own chat
    format. Types and counts are checked before anything is encoded, stopping at the first bad item."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(_is_id(t) for t in prompt):
        prompt = [prompt]
    elif not all(isinstance(p, str) or isinstance(p, list) and all(_is_id(t) for t in p) for p in prompt):
        raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of lists of "
                          "token ids", "prompt")
    try:
        ctx.engine.check_fits(len(prompt) * n)  # before anything is encoded
    except ValueError as e:
        raise bad_request(str(e), "prompt") from None
    return [await ctx.encode(p) if isinstance(p, str) else p for p in prompt]


def _is_id(t) -> bool:
    return type(t) is int  # not bool


def joined(first: dict | None, second: dict | None) -> dict | None:
    """Two legacy logprobs objects as one (the echoed prompt's, then the completion's)."""
    if first is None or second is None:
        return second
    return {key: first[key] + second[key] for key in second}


class CompletionReply:
    """len(prompts) * n choices; choice p * n + k is sample k of prompt p."""

    def __init__(self, ctx: ServerContext, handle: RequestHandle, model: str, prompts: list[list[int]],
                 req: CompletionRequest):
        self.ctx, self.handle, self.model, self.prompts, self.req = ctx, handle, model, prompts, req
        self.id, self.created = new_id("cmpl-"), int(time.time())
        self.choices = [CompletionOutput(i) for i in range(len(handle.request_ids))]

    def _echo(self, index: int) -> str:
        return self.ctx.tokenizer.decode(self.prompts[index // self.req.n]) if self.req.echo else ""

    def _prompt_logprobs(self, index: int) -> dict | None:
        """The echoed prompt's part of the logprobs, once the choice's first output brought it."""
        c = self.choices[index]
        if c.prompt_logprobs is None:
            return None
        return self._logprobs(self.prompts[index // self.req.n], c.prompt_logprobs, c.prompt_top_logprobs, 0)

    async def whole(self) -> dict:
        async for out in outputs(self.handle, self.ctx.config.keepalive_seconds):
            if out is not None:
                self.choices[out.index].add(out)
        choices = [{"index": i, "text": self._echo(i) + c.text, "finish_reason": c.finish_reason,
                    "logprobs": joined(self._prompt_logprobs(i), self._logprobs(c.token_ids, c.logprobs or [],
                                                                                c.top_logprobs or [],
                                                                                len(self._echo(i))))}
                   for i, c in enumerate(self.choices)]
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": choices, "usage": self.usage()}

    async def stream(self) -> AsyncIterator[str]:
        try:
            n = len(self.choices)
            offsets = [len(self._echo(i)) for i in range(n)]
            # With logprobs, a choice's echo waits for its first output, which brings the prompt's logprobs.
            waiting = set(range(n)) if self.req.echo and self.req.logprobs is not None else set()
            if self.req.echo and not waiting:
                for i in range(n):
                    yield self._chunk(i, self._echo(i))
            async for out in outputs(self.handle, self.ctx.config.keepalive_seconds):
                if out is None:
                    yield KEEPALIVE
                    continue
                self.choices[out.index].add(out)
                if out.index in waiting:
                    waiting.discard(out.index)
                    yield self._chunk(out.index, self._echo(out.index), self._prompt_logprobs(out.index))
                lp = self._logprobs(out.token_ids, out.logprobs or [], out.top_logprobs or [], offsets[out.index])
                offsets[out.index] += len(out.text)
                if out.text or out.finish_reason:
                    yield self._chunk(out.index, out.text, lp, out.finish_reason)
            if self.req.include_usage:
                yield sse({"id": self.id, "object": "text_completion", "created": self.created,
                           "model": self.model, "choices": [], "usage": self.usage()})
            yield DONE
        except GenerationError as e:
            yield sse({"error": {"message": str(e), "type": "server_error", "param": None, "code": None}})
        finally:
            self.handle.abort()

    def _chunk(self, index: int, text: str, logprobs: dict | None = None, finish_reason: str | None = None) -> str:
        return sse({"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
                    "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                 "finish_reason": finish_reason}]})

    def _logprobs(self, ids: list[int], logprobs: list[float | None], top, offset: int) -> dict | None:
        """The legacy completions shape: parallel lists of tokens, their logprobs and top alternatives (None for
        an echoed prompt's first token, which nothing predicts)."""
        if self.req.logprobs is None:
            return None
        tok = self.ctx.tokenizer
        strs = [tok.token_bytes(i).decode("utf-8", "replace") for i in ids]
        starts = [offset + sum(len(s) for s in strs[:k]) for k in range(len(strs))]
        return {"tokens": strs, "token_logprobs": [None if lp is None else max(lp, -9999.0) for lp in logprobs],
                "top_logprobs": [None if lp is None else
                                 {tok.token_bytes(j).decode("utf-8", "replace"): max(q, -9999.0) for j, q in t}
                                 for lp, t in zip(logprobs, top)], "text_offset": starts}

    def usage(self) -> dict:
        prompt = sum(self.handle.num_prompt_tokens[::self.req.n])
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@router.post("/tokenize", openapi_extra=body_schema(TokenizeRequest))
async def tokenize(request: Request) -> dict:
    ctx: ServerContext = request.app.state.ctx
    req: TokenizeRequest = parse_body(await request.body(), TokenizeRequest)
    ctx.model_name(req.model)
    if (req.prompt is None) == (req.messages is None):
        raise bad_request("give exactly one of prompt or messages", "prompt")
    if req.prompt is not None:
        ids = await ctx.encode(req.prompt)
    else:
        enable, clear = thinking_flags(req, ctx.config.clear_thinking)
        ids = await ctx.render_chat(chat_messages(req.messages), chat_tools(req.tools, None), enable, clear,
                                    req.add_generation_prompt)
    out = {"count": len(ids), "max_model_len": ctx.max_model_len, "tokens": ids}
    if req.return_token_strs:
        out["token_strs"] = [ctx.tokenizer.id_to_token(i) for i in ids]
    return out


@router.post("/detokenize", openapi_extra=body_schema(DetokenizeRequest))
async def detokenize(request: Request) -> dict:
    ctx: ServerContext = request.app.state.ctx
    req: DetokenizeRequest = parse_body(await request.body(), DetokenizeRequest)
    ctx.model_name(req.model)
    bad = next((t for t in req.tokens if not 0 <= t < ctx.tokenizer.vocab_size), None)
    if bad is not None:
        raise bad_request(f"token id {bad} is not in the vocabulary [0, {ctx.tokenizer.vocab_size})", "tokens")
    return {"prompt": await ctx.off_loop(ctx.tokenizer.decode, req.tokens)}
