"""Delta and ToolCallDelta: one piece of streamed output, shaped like an OpenAI chat-completion chunk's
`delta`. A call's first delta carries index, id and the whole name with arguments ""; the next one carries
only index and the call's whole arguments (a call is sent once it is complete)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ToolCallDelta:
    index: int  # position among the calls of this output: 0, 1, 2...
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass(slots=True)
class Delta:
    """Exactly one of the three fields is set."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


def merge_deltas(deltas: list[Delta]) -> list[Delta]:
    """Joins neighbouring text of the same kind, so one feed() returns few deltas however many markers it
    crossed. Call deltas stay apart."""
    merged: list[Delta] = []
    for d in deltas:
        prev = merged[-1] if merged else None
        if prev is not None and d.reasoning_content is not None and prev.reasoning_content is not None:
            prev.reasoning_content += d.reasoning_content
        elif prev is not None and d.content is not None and prev.content is not None:
            prev.content += d.content
        else:
            merged.append(d)
    return merged
