"""The text side's two output types: TextDelta, what one engine step added to one request as text (LLM's
generate_stream yields it, the server's handlers read it), and CompletionOutput, one request's deltas added
up. Also the finish-reason rule of a chat reply. Reasoning and tool calls are parsed elsewhere (glm47/parsers)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class TextDelta:
    """What one engine step added to one request (one sample of one prompt)."""
    index: int  # the position its caller gave it: LLM, its prompt's; the server, its choice's
    output_index: int  # LLM: which of its prompt's n samples (the server numbers choices with index alone: 0)
    text: str  # may be "" while a character or a possible stop string is held back
    token_ids: list[int]  # only the tokens before a stop string, when one ended it (speculative steps bring several)
    finish_reason: str | None = None  # set on the request's last delta: 'stop' | 'length' | 'abort' | 'error'
    stop_string: str | None = None  # on the last delta: the stop string that ended the text, if one did
    logprobs: list[float] | None = None  # per token, when asked
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0  # prompt tokens served by the prefix cache
    prompt_logprobs: list[float | None] | None = None  # on the first delta, when asked
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass(slots=True)
class CompletionOutput:
    """One request's output so far: every TextDelta of it, add()ed in order."""
    index: int  # which of the n samples
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # 'stop' | 'length' | 'abort' | 'error' once finished
    stop_string: str | None = None  # the stop string that ended it, if one did
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    num_cached_tokens: int = 0
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]]] | None = None
    # The text in the pieces the deltas brought, joined when read: `text += piece` would copy the whole text
    # on every step (a 30,000-token reply: ~2 GB of copying).
    pieces: list[str] = field(default_factory=list, repr=False)

    @property
    def text(self) -> str:
        if len(self.pieces) > 1:
            self.pieces[:] = ["".join(self.pieces)]
        return self.pieces[0] if self.pieces else ""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, d: TextDelta) -> None:
        if d.text:
            self.pieces.append(d.text)
        self.token_ids += d.token_ids
        if d.logprobs is not None:
            if self.logprobs is None:
                self.logprobs, self.top_logprobs = [], []
            self.logprobs += d.logprobs
            self.top_logprobs += d.top_logprobs
        self.num_cached_tokens = max(self.num_cached_tokens, d.num_cached_tokens)
        if d.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = d.prompt_logprobs, d.prompt_top_logprobs
        if d.finish_reason is not None:
            self.finish_reason, self.stop_string = d.finish_reason, d.stop_string


def chat_finish_reason(finish_reason: str | None, num_tool_calls: int) -> str | None:
    """A chat reply's finish reason: 'tool_calls' when it stopped after complete tool calls (a call cut off by
    a length limit, or one a stop string cut before its close, is none), else the request's own."""
    return "tool_calls" if num_tool_calls and finish_reason == "stop" else finish_reason
