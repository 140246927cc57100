"""CallParser: the state machine for one tool-call region, from just after <tool_call> to </tool_call>:
    <tool_call>NAME (<arg_key>KEY</arg_key> <arg_value>VALUE</arg_value>)* </tool_call>
GLM-4.7 writes it on one line; GLM-4.5 puts newlines between the tags; both parse alike. It turns the
region into the call's `arguments` JSON text, whole: a call is handed out only once </tool_call> closed it."""

from __future__ import annotations

from glm47.parsers.markers import (ALL, ARG_KEY_CLOSE, ARG_KEY_OPEN, ARG_VALUE_CLOSE, ARG_VALUE_OPEN,
                                   TOOL_CALL_CLOSE, TOOL_CALL_OPEN)
from glm47.parsers.schema import ToolSchemas, string_json, value_json

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
CALL = "call"  # a well-formed name of a requested tool: the call goes out once it is closed
DROP = "drop"  # a tool the request did not offer: parsed and swallowed
TEXT = "text"  # not a call at all: the raw region is text again


class CallParser:
    """Feed it the pieces a MarkerScanner cuts with `markers` (text() and marker()), then read `verdict`,
    `done`, and, once done, `arguments`. `raw` is every consumed character, for when the region turns out
    not to be a call (or is cut off)."""

    def __init__(self, schemas: ToolSchemas) -> None:
        self.schemas = schemas
        self.state = "name"
        # Growing texts are lists of parts: a call can be a long file body fed a few characters at a time.
        self._raw = [TOOL_CALL_OPEN]
        self.name = ""  # short: a name stops being a candidate beyond MAX_NAME
        self.verdict: str | None = None
        self.done = False
        self._args: list[str] = []  # the arguments JSON text so far
        self._key: list[str] = []
        self._value: list[str] = []

    @property
    def raw(self) -> str:
        return "".join(self._raw)

    @property
    def markers(self) -> tuple[str, ...]:
        return MARKERS[self.state]

    @property
    def arguments(self) -> str:
        """The arguments JSON object text; complete once `done`."""
        return "".join(self._args)

    def text(self, text: str) -> None:
        self._raw.append(text)
        if self.state == "name":
            self.name += text
            if not _could_be_name(self.name):
                self.verdict = TEXT  # decided early, so prose after a stray <tool_call> is not held up
        elif self.state == "key":
            self._key.append(text)
        elif self.state == "value":
            self._value.append(text)

    def marker(self, marker: str) -> bool:
        """Take a marker; False when it is not consumed because the region turned out to be text."""
        if self.state == "name":
            self.verdict = self._judge_name(marker)
            if self.verdict == TEXT:
                return False
        self._raw.append(marker)
        if marker == TOOL_CALL_CLOSE:
            self._args.append("}" if self._args else "{}")  # a key left without a value is dropped
            self.done = True
        elif marker == ARG_KEY_OPEN:
            self.state, self._key = "key", []
        elif marker == ARG_KEY_CLOSE:
            self.state = "gap"
        elif marker == ARG_VALUE_OPEN:
            self.state, self._value = "value", []
        elif marker == ARG_VALUE_CLOSE:
            self._close_value()
        return True

    def _judge_name(self, marker: str) -> str:
        name = self.name.strip()
        if marker not in (ARG_KEY_OPEN, TOOL_CALL_CLOSE) or not name or not _could_be_name(name):
            return TEXT
        self.name = name
        return CALL if self.schemas.knows(name) else DROP

    def _close_value(self) -> None:
        key = "".join(self._key).strip()
        value = value_json("".join(self._value), self.schemas.types(self.name, key))
        self._args.append(("{" if not self._args else ", ") + string_json(key) + ": " + value)
        self.state = "body"


def _could_be_name(text: str) -> bool:
    """Whether `text` (what followed <tool_call> so far) can still become a tool name."""
    name = text.strip()
    return len(name) <= MAX_NAME and not any(c.isspace() or c in NOT_IN_NAME for c in name)
