"""OpenAI's Responses API, POST /v1/responses, as Codex and the openai SDK's `client.responses` use it.

Input items become GLM chat messages: `instructions` and system/developer messages the system prompt; user
and assistant messages (input_text / output_text parts); a reasoning item, an assistant message and the
function_call items after it one assistant turn (reasoning kept: preserved thinking); function_call_output
items tool messages, in the order of their calls. Function tools are offered to the model, and so are the
function tools of `namespace` groups (a call of one carries its namespace back); tools that run on OpenAI's
side (web_search, file_search, code_interpreter, ...) are ignored, as the Anthropic route ignores server
tools. The reply is the same chat generation, answered as output items (reasoning with its text as a
summary, message, function_call) whole or as the Responses event stream: response.created, in_progress, per
item output_item.added, reasoning_summary_part / _text deltas, content_part / output_text deltas,
function_call_arguments delta + done, output_item.done, and response.completed (or .incomplete at
max_output_tokens). Responses are kept for previous_response_id (the last RESPONSES_KEPT, unless store is
false)."""

from __future__ import annotations

import collections
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import Field

from glm47.parsers import Delta
from glm47.server.async_engine import GenerationError, RequestHandle
from glm47.server.context import ServerContext, new_id
from glm47.server.protocol import (MAX_MESSAGES, MAX_TOOLS, Body, SamplingFields, bad_request, body_schema,
                                   chat_tools, order_tool_results, parse_body, samples,
                                   sampling_params)
from glm47.server.streaming import (KEEPALIVE, ChoiceState, abort_on_disconnect, block_events, parsed_reply,
                                    sse, sse_response)

router = APIRouter()
RESPONSES_KEPT = 256  # finished responses kept for previous_response_id (input + output items each)
HOSTED_TOOLS = {"web_search", "web_search_preview", "file_search", "code_interpreter", "computer_use_preview",
                "image_generation", "mcp", "local_shell"}


class Reasoning(Body):
    effort: str | None = None  # "none" / "minimal": no thinking; otherwise GLM-4.7 thinks
    summary: str | None = None


class ResponsesRequest(SamplingFields):
    input: str | list[dict[str, Any]] = Field(max_length=MAX_MESSAGES)
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    reasoning: Reasoning | None = None
    max_output_tokens: int | None = None
    store: bool = True
    previous_response_id: str | None = None


@router.post("/v1/responses", openapi_extra=body_schema(ResponsesRequest))
async def create_response(request: Request):
    ctx: ServerContext = request.app.state.ctx
    req: ResponsesRequest = parse_body(await request.body(), ResponsesRequest)
    model = ctx.model_name(req.model)
    history = []
    if req.previous_response_id is not None:
        history = _kept(request).get(req.previous_response_id)
        if history is None:
            raise bad_request(f"Previous response with id '{req.previous_response_id}' not found.",
                              "previous_response_id")
    items = history + _input_items(req.input)
    tools, namespaces = _tools(req.tools, req.tool_choice)
    thinking = req.reasoning is None or req.reasoning.effort not in ("none", "minimal")
    messages = to_messages(items, req.instructions)
    params = sampling_params(req, req.max_output_tokens, None, "max_output_tokens")
    prompt = await ctx.render_chat(messages, tools, thinking, clear_thinking=False)
    ctx.check_context(len(prompt), req.max_output_tokens, "input", "max_output_tokens")
    handle = await ctx.submit("resp", samples(prompt, params, 1))
    reply = ResponseReply(ctx, handle, model, tools, thinking, req, items, _kept(request), namespaces)
    if req.stream:
        return sse_response(reply.stream())
    async with abort_on_disconnect(request, handle):
        return JSONResponse(await reply.whole())


def _kept(request: Request) -> collections.OrderedDict:
    state = request.app.state
    if not hasattr(state, "responses"):
        state.responses = collections.OrderedDict()
    return state.responses


# ---- input items -> chat messages --------------------------------------------------------------------------
def _input_items(value: str | list[dict]) -> list[dict]:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    return value


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", f"{where}.content")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text", "text", "summary_text", "reasoning_text"):
            if not isinstance(part.get("text"), str):
                raise bad_request(f"{where}.content[{j}].text must be a string", f"{where}.content[{j}].text")
            texts.append(part["text"])
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise bad_request(f"{where}.content[{j}]: {kind!r} parts are not supported by this text-only model",
                              f"{where}.content[{j}]")
    return "".join(texts)


def to_messages(items: list[dict], instructions: str | None) -> list[dict]:
    """GLM chat messages for Responses input items (see the module docstring)."""
    system = [instructions] if instructions else []
    messages: list[dict] = []
    turn: dict | None = None  # the assistant turn being assembled from consecutive output items

    def assistant() -> dict:
        nonlocal turn
        if turn is None:
            turn = {"role": "assistant", "content": ""}
            messages.append(turn)
        return turn

    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(f"{where} must be an object", where)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _text_of(item.get("content"), where)
            if role in ("system", "developer"):
                system.append(text)
            elif role == "user":
                turn = None
                messages.append({"role": "user", "content": text})
            elif role == "assistant":
                if turn is not None and (turn["content"] or turn.get("tool_calls")):
                    turn = None  # a second assistant message is a new turn
                assistant()["content"] += text
            else:
                raise bad_request(f"{where}.role: unknown role {role!r}", f"{where}.role")
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            text = _text_of(parts, where)
            if turn is not None and (turn["content"] or turn.get("tool_calls")):
                turn = None
            if text:
                a = assistant()
                a["reasoning_content"] = a.get("reasoning_content", "") + text
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not isinstance(item.get("arguments", ""), str):
                raise bad_request(f"{where}: a function_call needs a string name and string arguments", where)
            assistant().setdefault("tool_calls", []).append({
                "id": item.get("call_id"), "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"}})
        elif kind == "function_call_output":
            if not isinstance(item.get("call_id"), str):
                raise bad_request(f"{where}.call_id must be a string", f"{where}.call_id")
            turn = None
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text_of(item.get("output", ""), where)})
        elif kind == "item_reference":
            raise bad_request(f"{where}: item references need stored items; send the items themselves", where)
        else:
            raise bad_request(f"{where}: input items of type {kind!r} are not supported", f"{where}.type")
    if system:
        messages.insert(0, {"role": "system", "content": "\n\n".join(system)})
    return order_tool_results(messages)


def _tools(tools: list[dict] | None, tool_choice: str | dict | None) -> tuple[list[dict] | None, dict[str, str]]:
    """Responses function tools ({type, name, description, parameters}) as chat tools, with the function tools
    of `namespace` groups (Codex sends its sub-agent tools so) among them; and each such function's namespace,
    which a call of it carries back."""
    functions, namespaces = [], {}

    def add(tool: dict, namespace: str | None = None) -> None:
        if any(f["function"].get("name") == tool.get("name") for f in functions):
            return  # a namespaced function named like another one: the first stays
        functions.append({"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")
                                                           if k in tool}})
        if namespace is not None:
            namespaces[tool.get("name")] = namespace

    for i, tool in enumerate(tools or []):
        kind = tool.get("type")
        if kind in HOSTED_TOOLS:
            continue  # run on OpenAI's side: nothing here can call them
        if kind == "namespace":
            for inner in tool.get("tools") or []:
                if isinstance(inner, dict) and inner.get("type") == "function":
                    add(inner, tool.get("name"))
        elif kind == "function":
            add(tool)
        else:
            raise bad_request(f"tools[{i}]: tools of type {kind!r} are not supported (function tools are)",
                              f"tools[{i}].type")
    choice = tool_choice if not isinstance(tool_choice, dict) else {"type": "function", "function": {
        "name": tool_choice.get("name")}} if tool_choice.get("type") == "function" else tool_choice
    return chat_tools(functions or None, choice), namespaces


# ---- the reply -----------------------------------------------------------------------------------------------
class ResponseReply:
    def __init__(self, ctx: ServerContext, handle: RequestHandle, model: str, tools: list[dict] | None,
                 thinking: bool, req: ResponsesRequest, items: list[dict], kept: collections.OrderedDict,
                 namespaces: dict[str, str]):
        self.ctx, self.handle, self.model, self.req, self.namespaces = ctx, handle, model, req, namespaces
        self.items, self.kept = items, kept
        self.st = ChoiceState(tools, thinking, lambda index: new_id("call_"))
        self.id, self.created = new_id("resp_"), int(time.time())
        self.seq = 0

    def envelope(self, status: str, output: list[dict]) -> dict:
        req = self.req
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {"id": self.id, "object": "response", "created_at": self.created, "status": status,
                "error": None, "incomplete_details": incomplete, "instructions": req.instructions,
                "max_output_tokens": req.max_output_tokens, "model": self.model, "output": output,
                "parallel_tool_calls": req.parallel_tool_calls is not False,
                "previous_response_id": req.previous_response_id,
                "reasoning": {"effort": req.reasoning.effort if req.reasoning else None,
                              "summary": req.reasoning.summary if req.reasoning else None},
                "store": req.store, "temperature": req.temperature, "text": {"format": {"type": "text"}},
                "tool_choice": req.tool_choice or "auto", "tools": req.tools or [], "top_p": req.top_p,
                "truncation": "disabled", "usage": self.usage() if status != "in_progress" else None,
                "metadata": {}}

    def finish(self, output: list[dict]) -> dict:
        status = "incomplete" if self.st.out.finish_reason == "length" else "completed"
        if self.req.store:
            self.kept[self.id] = self.items + output
            while len(self.kept) > RESPONSES_KEPT:
                self.kept.popitem(last=False)
        return self.envelope(status, output)

    async def whole(self) -> dict:
        parsed, _ = await parsed_reply(self.handle, self.st, self.ctx.config.keepalive_seconds)
        output = []
        if parsed.reasoning_content is not None:
            output.append(_reasoning_item(new_id("rs_"), parsed.reasoning_content))
        if parsed.content is not None:
            output.append(_message_item(new_id("msg_"), parsed.content))
        for call in parsed.tool_calls:
            output.append(_call_item(new_id("fc_"), call.id, call.name, call.arguments,
                                     namespace=self.namespaces.get(call.name)))
        return self.finish(output)

    def event(self, kind: str, **data) -> str:
        self.seq += 1
        return sse({"type": kind, "sequence_number": self.seq - 1, **data}, kind)

    async def stream(self) -> AsyncIterator[str]:
        items = _Items(self)
        try:
            yield self.event("response.created", response=self.envelope("in_progress", []))
            yield self.event("response.in_progress", response=self.envelope("in_progress", []))
            async for event in block_events(self.handle, self.st, self.ctx.config.keepalive_seconds, items,
                                            KEEPALIVE):
                yield event
            response = self.finish(items.done)
            yield self.event(f"response.{response['status']}", response=response)
        except GenerationError as e:
            yield self.event("error", code=e.code, message=str(e), param=None)
        finally:
            self.handle.abort()

    def usage(self) -> dict:
        prompt, out = self.handle.num_prompt_tokens[0], len(self.st.out.token_ids)
        return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": self.st.out.num_cached_tokens},
                "output_tokens": out,
                "output_tokens_details": {"reasoning_tokens": self.st.reasoning_tokens(self.ctx.think_end_id)},
                "total_tokens": prompt + out}


def _reasoning_item(item_id: str, text: str) -> dict:
    return {"type": "reasoning", "id": item_id, "summary": [{"type": "summary_text", "text": text}]}


def _message_item(item_id: str, text: str, status: str = "completed") -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}] if status == "completed" else []}


def _call_item(item_id: str, call_id: str, name: str, arguments: str, status: str = "completed",
               namespace: str | None = None) -> dict:
    item = {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments,
            "status": status}
    return item if namespace is None else {**item, "namespace": namespace}


class _Items:
    """Parsed deltas -> Responses stream events: one output item open at a time."""

    def __init__(self, reply: ResponseReply):
        self.reply = reply
        self.done: list[dict] = []  # finished output items, in order
        self.kind: str | None = None  # 'reasoning' | 'message' while one is open
        self.item_id, self.text = "", ""
        self.call: dict = {}  # the function_call whose complete arguments come next

    def add(self, d: Delta) -> list[str]:
        r = self.reply
        if d.reasoning_content is not None or d.content is not None:
            kind = "reasoning" if d.reasoning_content is not None else "message"
            events = [] if self.kind == kind else self.close() + self._open(kind)
            piece = d.reasoning_content if kind == "reasoning" else d.content
            self.text += piece
            where = dict(item_id=self.item_id, output_index=len(self.done))
            if kind == "reasoning":
                return events + [r.event("response.reasoning_summary_text.delta", **where, summary_index=0,
                                         delta=piece)]
            return events + [r.event("response.output_text.delta", **where, content_index=0, delta=piece,
                                     logprobs=[])]
        events = self.close()
        for call in d.tool_calls:
            if call.id is not None:  # a call's header: its complete arguments follow in the next delta
                self.call = _call_item(new_id("fc_"), call.id, call.name, "", "in_progress",
                                       r.namespaces.get(call.name))
                events.append(r.event("response.output_item.added", output_index=len(self.done), item=self.call))
                continue
            item = {**self.call, "arguments": call.arguments, "status": "completed"}
            where = dict(item_id=item["id"], output_index=len(self.done))
            events += [r.event("response.function_call_arguments.delta", **where, delta=call.arguments),
                       r.event("response.function_call_arguments.done", **where, arguments=call.arguments,
                               name=item["name"]),
                       r.event("response.output_item.done", output_index=len(self.done), item=item)]
            self.done.append(item)
        return events

    def _open(self, kind: str) -> list[str]:
        r, index = self.reply, len(self.done)
        self.kind, self.text = kind, ""
        if kind == "reasoning":
            self.item_id = new_id("rs_")
            return [r.event("response.output_item.added", output_index=index,
                            item={"type": "reasoning", "id": self.item_id, "summary": []}),
                    r.event("response.reasoning_summary_part.added", item_id=self.item_id, output_index=index,
                            summary_index=0, part={"type": "summary_text", "text": ""})]
        self.item_id = new_id("msg_")
        return [r.event("response.output_item.added", output_index=index,
                        item=_message_item(self.item_id, "", "in_progress")),
                r.event("response.content_part.added", item_id=self.item_id, output_index=index, content_index=0,
                        part={"type": "output_text", "text": "", "annotations": []})]

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        r, index, where = self.reply, len(self.done), dict(item_id=self.item_id, output_index=len(self.done))
        if self.kind == "reasoning":
            item = _reasoning_item(self.item_id, self.text)
            events = [r.event("response.reasoning_summary_text.done", **where, summary_index=0, text=self.text),
                      r.event("response.reasoning_summary_part.done", **where, summary_index=0,
                              part={"type": "summary_text", "text": self.text})]
        else:
            item = _message_item(self.item_id, self.text)
            part = {"type": "output_text", "text": self.text, "annotations": []}
            events = [r.event("response.output_text.done", **where, content_index=0, text=self.text, logprobs=[]),
                      r.event("response.content_part.done", **where, content_index=0, part=part)]
        events.append(r.event("response.output_item.done", output_index=index, item=item))
        self.done.append(item)
        self.kind = None
        return events

