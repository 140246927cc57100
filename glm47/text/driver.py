"""TextDriver: the loop between an engine and text, shared by the LLM facade and the server's engine thread.
It adds requests (each with a TextTrack), feeds each engine output to its track, aborts in the engine a
request that a stop string ended (its KV blocks are freed at once), and retires a request after its last
TextDelta. Not thread-safe: one thread makes every call, as it does every engine call."""

from __future__ import annotations

from glm47.chat import Tokenizer
from glm47.sampling_params import SamplingParams
from glm47.text.output import TextDelta
from glm47.text.track import TextTrack


class TextDriver:
    def __init__(self, engine, tokenizer: Tokenizer):
        """engine: an LLMEngine or anything with its interface (add_request, step, abort, eos_token_ids)."""
        self.engine = engine
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(engine.eos_token_ids)
        self._tracks: dict[str, TextTrack] = {}  # request id -> track, until its last delta

    def __len__(self) -> int:
        """Requests whose last delta has not come yet."""
        return len(self._tracks)

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._tracks

    def add(self, prompt_token_ids: list[int], params: SamplingParams, index: int, output_index: int = 0,
            request_id: str | None = None) -> str:
        """Adds one engine request; its deltas carry index and output_index. Returns its request id; raises what
        the engine's add_request raises (ValueError for a request that is malformed or can never fit)."""
        track = TextTrack(self.tokenizer, params, self.eos_token_ids, index, output_index)
        request_id = self.engine.add_request(prompt_token_ids, params, request_id=request_id)
        self._tracks[request_id] = track
        return request_id

    def feed(self, o) -> TextDelta | None:
        """The delta of one engine output (a StepOutput); None for a request this driver no longer follows
        (aborted, or ended by a stop string, before the engine said so)."""
        track = self._tracks.get(o.request_id)
        if track is None:
            return None
        delta = track.feed(o)
        if delta.finish_reason is not None:
            del self._tracks[o.request_id]
            if not o.finished:  # a stop string ended it: free its blocks now
                self.engine.abort(o.request_id)
        return delta

    def step(self) -> list[TextDelta]:
        """One engine step's deltas."""
        return [d for o in self.engine.step() if (d := self.feed(o)) is not None]

    def abort(self, request_id: str) -> TextDelta | None:
        """Stops a request now (the engine frees its blocks) and returns its last delta, finish_reason 'abort';
        None for a request this driver no longer follows. The engine's own 'abort' output is then ignored."""
        track = self._tracks.pop(request_id, None)
        if track is None:
            return None
        self.engine.abort(request_id)
        return TextDelta(track.index, track.output_index, "", [], "abort")

    def abort_all(self) -> list[TextDelta]:
        return [self.abort(rid) for rid in list(self._tracks)]
