"""The special-token texts GLM-4.7 writes to structure its output, and which of them matter where.
Each is one token id in the vocabulary but arrives here as decoded text, possibly split across pieces."""

from __future__ import annotations

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
ARG_KEY_OPEN = "<arg_key>"
ARG_KEY_CLOSE = "</arg_key>"
ARG_VALUE_OPEN = "<arg_value>"
ARG_VALUE_CLOSE = "</arg_value>"

# Outside a tool call only these three change anything; any other marker there is plain text.
TOP_LEVEL = (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN)
ALL = (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE,
       ARG_KEY_OPEN, ARG_KEY_CLOSE, ARG_VALUE_OPEN, ARG_VALUE_CLOSE)
LONGEST = max(map(len, ALL))
