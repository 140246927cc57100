"""Splitter: the output state machine. It routes decoded text to reasoning, content or tool calls,
piece by piece, and produces Deltas. OutputStream presents them to a client; parse_output joins them.
Being the one machine behind both is what makes streaming and non-streaming agree."""

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
                     out not to be a call (no valid name) is text of the channel it interrupted.
    `cut` is set by close() when a call that was already announced never reached </tool_call>:
    (its index, its raw text)."""

    def __init__(self, tools: list[dict] | None, thinking: bool,
                 call_id: Callable[[int], str] | None = None) -> None:
        self.schemas = ToolSchemas(tools)
        self.call_id = call_id or random_call_id
        self.reasoning = thinking
        self._reasoning_before_call = False
        self.n_calls = 0
        self.cut: tuple[int, str] | None = None
        self._scanner = MarkerScanner()
        self._call: CallParser | None = None
        self._call_index: int | None = None  # set once the current call is announced
        self._out: list[Delta] = []

    def feed(self, text: str) -> list[Delta]:
        self._scanner.push(text)
        self._run(final=False)
        return self._take()

    def close(self) -> list[Delta]:
        self._run(final=True)
        if self._call is not None:  # the output ended inside a call region
            if self._call_index is None:
                self._text(self._call.raw)
            else:
                self.cut = (self._call_index, self._call.raw)
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
        if call.verdict == CALL and self._call_index is None:
            self._call_index, self.n_calls = self.n_calls, self.n_calls + 1
            header = ToolCallDelta(self._call_index, self.call_id(self._call_index), call.name, "")
            self._out.append(Delta(tool_calls=[header]))
        fragment = call.take()
        if fragment:
            self._out.append(Delta(tool_calls=[ToolCallDelta(self._call_index, arguments=fragment)]))
        if call.verdict == TEXT:  # e.g. reasoning that mentions "<tool_call> tags" goes on as reasoning
            self._call, self.reasoning = None, self._reasoning_before_call
            self._text(call.raw)
        elif call.done:
            self._call, self._call_index = None, None

    def _text(self, text: str) -> None:
        if text:
            self._out.append(Delta(reasoning_content=text) if self.reasoning else Delta(content=text))

    def _take(self) -> list[Delta]:
        out, self._out = self._out, []
        return out
