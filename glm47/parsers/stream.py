"""OutputStream: a GLM-4.7 output parsed as it is generated, into OpenAI-style stream deltas.
A call is announced once its name is complete and its arguments then stream as generated, so a call the
output cuts off before </tool_call> cannot be taken back: close() leaves its arguments unclosed JSON and
names it in `truncated_call`, while parse_output makes that text content. It is the only difference between
the two (a cut call not yet announced is content in both), and what streaming parsers such as vLLM's do."""

from __future__ import annotations

from typing import Callable

from glm47.parsers.deltas import Delta, merge_deltas
from glm47.parsers.splitter import Splitter


class OutputStream:
    """feed(text) with each decoded piece, then close() once at the end; each returns the new deltas.
    Concatenating every delta gives what parse_output returns for the whole text (except truncated_call).
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
        """Calls announced so far (a server answers finish_reason "tool_calls" when non-zero)."""
        return self._splitter.n_calls

    @property
    def truncated_call(self) -> int | None:
        """After close(): index of an announced call that never reached </tool_call>, else None."""
        return None if self._splitter.cut is None else self._splitter.cut[0]

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
