"""OutputStream: a GLM-4.7 output parsed as it is generated, into OpenAI-style stream deltas.
A tool call goes out only once </tool_call> has closed it, whole (header, then its complete arguments), so
no half-finished call ever reaches a client; a call the output cuts off is content, as in parse_output."""

from __future__ import annotations

from typing import Callable

from glm47.parsers.deltas import Delta, merge_deltas
from glm47.parsers.splitter import Splitter


class OutputStream:
    """feed(text) with each decoded piece, then close() once at the end; each returns the new deltas.
    Concatenating every delta gives what parse_output returns for the whole text, cut-off text included.
    Text that is blank so far (whitespace only) is held back per channel and dropped if nothing else comes,
    matching parse_output's "blank counts as None". call_id(index) makes ids; default random."""

    def __init__(self, tools: list[dict] | None = None, thinking: bool = True, *,
                 call_id: Callable[[int], str] | None = None) -> None:
        self._splitter = Splitter(tools, thinking, call_id)
        self._blank = {"reasoning_content": "", "content": ""}  # held whitespace, until text follows
        self._shown = {"reasoning_content": False, "content": False}
        self._closed = False

    @property
    def num_tool_calls(self) -> int:
        """Complete calls sent so far (a server answers finish_reason "tool_calls" when non-zero)."""
        return self._splitter.n_calls

    def feed(self, text: str) -> list[Delta]:
        if self._closed:
            raise RuntimeError("OutputStream.feed() after close()")
        return self._present(self._splitter.feed(text))

    def close(self) -> list[Delta]:
        if self._closed:
            return []
        self._closed = True
        return self._present(self._splitter.close())

    def _present(self, deltas: list[Delta]) -> list[Delta]:
        shown = []
        for d in deltas:
            field = next((f for f in self._blank if getattr(d, f) is not None), None)
            if field is None or self._shown[field]:
                shown.append(d)
                continue
            held = self._blank[field] + getattr(d, field)
            if held.strip():
                self._shown[field], self._blank[field] = True, ""
                shown.append(Delta(**{field: held}))
            else:
                self._blank[field] = held
        return merge_deltas(shown)
