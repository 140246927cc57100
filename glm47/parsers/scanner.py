"""MarkerScanner: cuts a growing text into runs of plain text and markers, for a state machine that says
which markers count in its current state. A tail that could still become a marker (`<too`) is held back
until more text or the end arrives, so a marker split across pieces is never mistaken for text."""

from __future__ import annotations

from glm47.parsers.markers import LONGEST


class MarkerScanner:
    """push() text, then call next() until it returns None; next() never returns text that could be the
    start of one of the markers it was asked about, unless final (no more text will come)."""

    __slots__ = ("_buf", "_pos", "_found")

    def __init__(self) -> None:
        self._buf = ""
        self._pos = 0  # everything before _pos has been handed out
        self._found: dict[str, int] = {}  # marker -> where buf.find found it last (-1: not in buf)

    def push(self, text: str) -> None:
        self._buf = self._buf[self._pos:] + text  # what is left is at most a held-back tail: short
        self._pos = 0
        self._found.clear()

    def next(self, markers: tuple[str, ...], final: bool) -> tuple[str, str | None] | None:
        """The next (text, marker) piece: text up to the earliest of `markers` and that marker, or
        (text, None) when no marker is in sight; None when nothing can be handed out yet."""
        buf, pos = self._buf, self._pos
        if pos >= len(buf):
            return None
        at, hit = -1, None
        for marker in markers:
            i = self._find(marker)
            if i != -1 and (hit is None or i < at):
                at, hit = i, marker
        if hit is not None:
            self._pos = at + len(hit)
            return buf[pos:at], hit
        end = len(buf)
        if not final:
            # Every marker starts with "<" and has no other "<", so only the last "<" can begin one.
            lt = buf.rfind("<", pos)
            if lt != -1 and end - lt < LONGEST and any(m.startswith(buf[lt:]) for m in markers):
                end = lt
        if end == pos:
            return None
        self._pos = end
        return buf[pos:end], None

    def _find(self, marker: str) -> int:
        # Caching the last find keeps one long text with many markers linear instead of quadratic.
        i = self._found.get(marker)
        if i is None or (i != -1 and i < self._pos):
            i = self._buf.find(marker, self._pos)
            self._found[marker] = i
        return i
