"""TextTrack: the text of one engine request. It turns each engine output's new token ids into a TextDelta:
incremental detokenizing, the stop token hidden, the text cut at the first stop string (and the token ids
with it). It never calls the engine: TextDriver (glm47/text/driver.py) aborts what a stop string ended."""

from __future__ import annotations

from glm47.chat import Tokenizer
from glm47.sampling_params import SamplingParams
from glm47.text.output import TextDelta
from glm47.text.stop_strings import StopStringMatcher


class TextTrack:
    __slots__ = ("index", "output_index", "stop_ids", "decoder", "matcher")

    def __init__(self, tokenizer: Tokenizer, params: SamplingParams, eos_token_ids: frozenset[int], index: int,
                 output_index: int = 0):
        self.index, self.output_index = index, output_index
        # The ids the engine stops on (as in LLMEngine.add_request): they end the reply and are not text.
        self.stop_ids = frozenset(params.stop_token_ids or ()) | (
            frozenset() if params.ignore_eos else eos_token_ids)
        self.decoder = tokenizer.stream_decoder(params.skip_special_tokens)
        self.matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)

    def feed(self, o) -> TextDelta:
        """o: the engine's StepOutput for this request. The delta's finish_reason is set when this is its last:
        the engine finished it, or a stop string did (then the engine may still be running it)."""
        ids, reason = o.new_token_ids, o.finish_reason
        # The stop token ends the reply; it is counted but not shown as text.
        shown = ids[:-1] if reason == "stop" and ids and ids[-1] in self.stop_ids else ids
        # With stop strings, several ids go in one at a time, so that a string ends the output at its own token.
        pieces = [[t] for t in shown] if self.matcher.stops and len(shown) > 1 else [shown]
        text = ""
        for i, piece in enumerate(pieces):
            more, stopped = self.matcher.feed(self.decoder.feed(piece))
            text += more
            if stopped:  # a stop string: the request ends here whatever the engine thinks
                return self._delta(o.head(i + 1 if len(pieces) > 1 else len(ids)), text, "stop")
        if o.finished:
            tail, _ = self.matcher.feed(self.decoder.flush())
            text += tail + self.matcher.flush()
        return self._delta(o, text, reason if o.finished else None)

    def _delta(self, o, text: str, finish_reason: str | None) -> TextDelta:
        stop_string = self.matcher.matched if finish_reason is not None else None
        return TextDelta(self.index, self.output_index, text, o.new_token_ids, finish_reason, stop_string,
                         o.logprobs, o.top_logprobs, o.num_cached_tokens, o.prompt_logprobs, o.prompt_top_logprobs)
