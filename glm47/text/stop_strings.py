"""Stop strings over streamed text: cut the output at the first stop string, even one split across tokens.
Fed decoded pieces one at a time, the matcher holds back any tail that could be the start of a stop string,
so a stop is never half-emitted. Pure Python: the engine itself only knows stop token ids (STYLE.md §7)."""

from __future__ import annotations


def find_first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    """(start, stop) of the stop occurrence that ends first; of two ending at the same place, the longer.
    "Ends first" is what a stream sees first, so the answer does not depend on how the text was split
    (it differs from "starts first" only when one stop string contains another)."""
    best = None
    for stop in stops:
        start = text.find(stop)  # the first start is also the first end, for one stop string
        if start >= 0:
            key = (start + len(stop), -len(stop))
            if best is None or key < best[0]:
                best = (key, start, stop)
    return None if best is None else (best[1], best[2])


def partial_stop_length(text: str, stops: list[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of some stop string (0 if none)."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


class StopStringMatcher:
    """Concatenating every feed()'s emitted text and flush() gives the whole text cut at the first stop string
    (with the stop itself when include_stop). After a stop, feed() emits nothing and `matched` names the stop."""

    __slots__ = ("stops", "include_stop", "matched", "_held")

    def __init__(self, stops: list[str] | str | None, include_stop: bool = False):
        stops = [stops] if isinstance(stops, str) else list(stops or [])
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stops must be non-empty strings, got {stops!r}")
        self.stops = stops
        self.include_stop = include_stop
        self.matched: str | None = None
        self._held = ""  # emitted later or never: it might be the start of a stop string

    @property
    def stopped(self) -> bool:
        return self.matched is not None

    def feed(self, text: str) -> tuple[str, bool]:
        """Take the next decoded piece; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        # Any stop occurrence must start inside _held + text: earlier text was emitted only once no stop
        # could begin there.
        buf = self._held + text
        hit = find_first_stop(buf, self.stops)
        if hit is not None:
            start, stop = hit
            self.matched, self._held = stop, ""
            return buf[: start + len(stop) if self.include_stop else start], True
        cut = len(buf) - partial_stop_length(buf, self.stops)
        self._held = buf[cut:]
        return buf[:cut], False

    def flush(self) -> str:
        """Generation ended for another reason (eos, length): release the held-back text."""
        held, self._held = self._held, ""
        return held
