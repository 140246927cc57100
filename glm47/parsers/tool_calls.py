"""CallParser: the state machine for one tool-call region, from just after <tool_call> to </tool_call>:
    <tool_call>NAME (<arg_key>KEY</arg_key> <arg_value>VALUE</arg_value>)* </tool_call>
GLM-4.7 writes it on one line; GLM-4.5 puts newlines between the tags; both parse alike. It turns the
region into the call's `arguments` JSON text, in fragments as soon as each is certain."""

from __future__ import annotations

from glm47.parsers.markers import (ALL, ARG_KEY_CLOSE, ARG_KEY_OPEN, ARG_VALUE_CLOSE, ARG_VALUE_OPEN,
                                   TOOL_CALL_CLOSE, TOOL_CALL_OPEN)
from glm47.parsers.schema import (NULL, ToolSchemas, is_string_param, string_fragment, string_json,
                                  value_json)

# Tool names are identifiers (OpenAI allows [a-zA-Z0-9_-]{1,64}; MCP adds dots, slashes, colons). A name
# with a space or JSON punctuation means "<tool_call>" was prose, not a call.
MAX_NAME = 256
NOT_IN_NAME = frozenset("<>{}[]()\"'`,;=")

# The markers that move each state on; text in "body" and "gap" (between tags) is whitespace in
# well-formed output, and anything else there is dropped.
MARKERS = {
    "name": ALL,  # every marker ends the name: the two expected ones, or any other as malformed
    "body": (ARG_KEY_OPEN, TOOL_CALL_CLOSE),
    "key": (ARG_KEY_CLOSE,),
    "gap": (ARG_VALUE_OPEN, ARG_KEY_OPEN, TOOL_CALL_CLOSE),
    # Only </arg_value> ends a value, so a file body may contain any other marker text.
    "value": (ARG_VALUE_CLOSE,),
}

# Verdicts, given when the name ends.
CALL = "call"  # a well-formed name of a requested tool: the call streams out
DROP = "drop"  # a tool the request did not offer: parsed and swallowed
TEXT = "text"  # not a call at all: the raw region is text again


class CallParser:
    """Feed it the pieces a MarkerScanner cuts with `markers` (text() and marker()), then read `verdict`,
    `done`, and take() the arguments fragments produced so far (only for verdict CALL). `raw` is every
    consumed character, for when the region turns out not to be a call (or is cut off)."""

    def __init__(self, schemas: ToolSchemas) -> None:
        self.schemas = schemas
        self.state = "name"
        # Growing texts are lists of parts: a call can be a long file body fed a few characters at a time.
        self._raw = [TOOL_CALL_OPEN]
        self.name = ""  # short: a name stops being a candidate beyond MAX_NAME
        self.verdict: str | None = None
        self.done = False
        self._out: list[str] = []  # arguments fragments not yet taken
        self._n_args = 0
        self._key: list[str] = []
        self._types: frozenset[str] | None = None
        self._value: list[str] = []  # a non-string value, held until </arg_value> decides how it parses
        self._streaming = False  # inside a string value whose opening quote was sent

    @property
    def raw(self) -> str:
        return "".join(self._raw)

    @property
    def markers(self) -> tuple[str, ...]:
        return MARKERS[self.state]

    def take(self) -> str:
        out, self._out = "".join(self._out), []
        return out

    def text(self, text: str) -> None:
        self._raw.append(text)
        if self.state == "name":
            self.name += text
            if not _could_be_name(self.name):
                self.verdict = TEXT  # decided early, so prose after a stray <tool_call> is not held up
        elif self.state == "key":
            self._key.append(text)
        elif self.state == "value":
            self._value_text(text)

    def marker(self, marker: str) -> bool:
        """Take a marker; False when it is not consumed because the region turned out to be text."""
        if self.state == "name":
            self.verdict = self._judge_name(marker)
            if self.verdict == TEXT:
                return False
        self._raw.append(marker)
        if marker == TOOL_CALL_CLOSE:
            self._emit("}" if self._n_args else "{}")  # a key left without a value is dropped
            self.done = True
        elif marker == ARG_KEY_OPEN:
            self.state, self._key = "key", []
        elif marker == ARG_KEY_CLOSE:
            self.state = "gap"
        elif marker == ARG_VALUE_OPEN:
            self._open_value()
        elif marker == ARG_VALUE_CLOSE:
            self._close_value()
        return True

    def _judge_name(self, marker: str) -> str:
        name = self.name.strip()
        if marker not in (ARG_KEY_OPEN, TOOL_CALL_CLOSE) or not name or not _could_be_name(name):
            return TEXT
        self.name = name
        return CALL if self.schemas.knows(name) else DROP

    def _open_value(self) -> None:
        key = "".join(self._key).strip()
        self._types = self.schemas.types(self.name, key)
        self._emit(("{" if self._n_args == 0 else ", ") + string_json(key) + ": ")
        self._n_args += 1
        self.state, self._value = "value", []
        # A string that cannot be null streams from its first character; one that can waits while it
        # might still be the bare word null (how the template writes None).
        self._streaming = is_string_param(self._types) and NULL not in self._types
        if self._streaming:
            self._emit('"')

    def _value_text(self, text: str) -> None:
        if self._streaming:
            self._emit(string_fragment(text))
            return
        self._value.append(text)
        if is_string_param(self._types) and not "null".startswith("".join(self._value)):
            self._emit('"' + string_fragment("".join(self._value)))  # at most 5 characters were held
            self._streaming = True

    def _close_value(self) -> None:
        value = "".join(self._value)
        if self._streaming:
            self._emit('"')
        elif is_string_param(self._types):
            self._emit("null" if value == "null" else string_json(value))
        else:
            self._emit(value_json(value, self._types))
        self.state = "body"

    def _emit(self, fragment: str) -> None:
        if self.verdict == CALL:
            self._out.append(fragment)


def _could_be_name(text: str) -> bool:
    """Whether `text` (what followed <tool_call> so far) can still become a tool name."""
    name = text.strip()
    return len(name) <= MAX_NAME and not any(c.isspace() or c in NOT_IN_NAME for c in name)
