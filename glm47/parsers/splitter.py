"""Splitter: the output state machine. It routes decoded text to reasoning, content or tool calls,
piece by piece, and produces Deltas. OutputStream presents them to a client; parse_output joins them.
Being the one machine behind both is what makes streaming and non-streaming agree. A tool call is held
back until </tool_call> closes it, so no half-finished call is ever handed out."""

from __future__ import annotations

import secrets
from typing import Callable

from glm47.parsers.deltas import Delta, ToolCallDelta
from glm47.parsers.markers import THINK_CLOSE, THINK_OPEN, TOOL_CALL_OPEN, TOP_LEVEL
from glm47.parsers.scanner import MarkerScanner
from glm47.parsers.schema import ToolSchemas
from glm47.parsers.tool_calls import CALL, TEXT, CallParser


def random_call_id(index: int) -> str:
    """OpenAI-style call ids are random: clients key tool results by them across a whole conversation."""
    return "call_" + secrets.token_hex(12)


class Splitter:
    """Top-level states: reasoning or content (thinking=True starts in reasoning), or inside a tool-call
    region (delegated to a CallParser). Transitions, the same from either start:
      </think>   -> content          (in content: dropped, never shown)
      <think>    -> reasoning        (in reasoning: dropped)
      <tool_call> -> a call region; reasoning is over, the region ends in content. A region that turns
                     out not to be a call (no valid name) is text of the channel it interrupted; one
                     that the end cuts off before </tool_call> is content, its raw text.
    A call comes out whole when it closes: a header delta (index, id, name, arguments "") and then one
    delta with its whole arguments."""

    def __init__(self, tools: list[dict] | None, thinking: bool,
                 call_id: Callable[[int], str] | None = None) -> None:
        self.schemas = ToolSchemas(tools)
        self.call_id = call_id or random_call_id
        self.reasoning = thinking
        self._reasoning_before_call = False
        self.n_calls = 0
        self._scanner = MarkerScanner()
        self._call: CallParser | None = None
        self._out: list[Delta] = []

    def feed(self, text: str) -> list[Delta]:
        self._scanner.push(text)
        self._run(final=False)
        return self._take()

    def close(self) -> list[Delta]:
        self._run(final=True)
        if self._call is not None:  # the output ended inside a call region: no call, its text is content
            self._text(self._call.raw)
            self._call = None
        return self._take()

    def _run(self, final: bool) -> None:
        while True:
            markers = self._call.markers if self._call else TOP_LEVEL
            piece = self._scanner.next(markers, final)
            if piece is None:
                return
            text, marker = piece
            if text:
                self._on_text(text)
            if marker:
                self._on_marker(marker)

    def _on_text(self, text: str) -> None:
        if self._call is None:
            self._text(text)
        else:
            self._call.text(text)
            self._after_call_step()

    def _on_marker(self, marker: str) -> None:
        if self._call is not None:
            consumed = self._call.marker(marker)
            self._after_call_step()
            if not consumed:  # the region was text after all; the marker belongs to what follows it
                self._on_marker(marker)
        elif marker == TOOL_CALL_OPEN:
            self._reasoning_before_call, self.reasoning = self.reasoning, False
            self._call = CallParser(self.schemas)
        elif marker in (THINK_OPEN, THINK_CLOSE):
            self.reasoning = marker == THINK_OPEN
        else:  # a marker that means nothing out here (only reachable after a region fell back to text)
            self._text(marker)

    def _after_call_step(self) -> None:
        call = self._call
        if call.verdict == TEXT:  # e.g. reasoning that mentions "<tool_call> tags" goes on as reasoning
            self._call, self.reasoning = None, self._reasoning_before_call
            self._text(call.raw)
        elif call.done:
            self._call = None
            if call.verdict == CALL:  # (a DROP call is swallowed)
                index, self.n_calls = self.n_calls, self.n_calls + 1
                self._out.append(Delta(tool_calls=[ToolCallDelta(index, self.call_id(index), call.name, "")]))
                self._out.append(Delta(tool_calls=[ToolCallDelta(index, arguments=call.arguments)]))

    def _text(self, text: str) -> None:
        if text:
            self._out.append(Delta(reasoning_content=text) if self.reasoning else Delta(content=text))

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out
