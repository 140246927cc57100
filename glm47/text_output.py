"""TextTrack: the text side of one engine request, shared by the LLM facade and the server. It turns the
engine's new token ids into text (incremental detokenizing), hides the stop token, and cuts the text at
the first stop string. It does not parse reasoning or tool calls (glm47/parsers) and never calls the engine:
when a stop string ends a request the engine still thinks is running, the caller must abort it."""

from __future__ import annotations

from dataclasses import dataclass

from glm47.chat import Tokenizer
from glm47.engine.sampling import SamplingParams
from glm47.stop_strings import StopStringMatcher


@dataclass(slots=True)
class TextStep:
    text: str  # text this step adds (may be "" while a character or a possible stop string is held back)
    done: bool  # the request's last step
    finish_reason: str | None  # set when done: 'stop' | 'length' | 'abort'
    abort: bool  # a stop string ended it but the engine has not finished it: the caller must abort it
    num_tokens: int  # how many of the step's token ids belong to the output: all, unless a stop string ended it
    # on an earlier one (a speculative step brings several); the caller reports and counts only these


class TextTrack:
    __slots__ = ("stop_ids", "decoder", "matcher")

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_token_ids: frozenset[int]):
        # The ids the engine stops on (as in LLMEngine.add_request): they end the reply and are not text.
        self.stop_ids = frozenset(params.stop_token_ids or ()) | (
            frozenset() if params.ignore_eos else eos_token_ids)
        self.decoder = tokenizer.stream_decoder(params.skip_special_tokens)
        self.matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.matcher.matched

    def feed(self, new_token_ids: list[int], finished: bool, finish_reason: str | None) -> TextStep:
        ids, reason = new_token_ids, finish_reason
        # The stop token ends the reply; it is counted but not shown as text.
        shown = ids[:-1] if reason == "stop" and ids and ids[-1] in self.stop_ids else ids
        # With stop strings, several ids go in one at a time, so that a string ends the output at its own token.
        pieces = [[t] for t in shown] if self.matcher.stops and len(shown) > 1 else [shown]
        text = ""
        for i, piece in enumerate(pieces):
            more, stopped = self.matcher.feed(self.decoder.feed(piece))
            text += more
            if stopped:  # a stop string: the request ends here whatever the engine thinks
                return TextStep(text, True, "stop", not finished, i + 1 if len(pieces) > 1 else len(ids))
        if finished:
            tail, _ = self.matcher.feed(self.decoder.flush())
            text += tail + self.matcher.flush()
        return TextStep(text, finished, reason if finished else None, False, len(ids))
