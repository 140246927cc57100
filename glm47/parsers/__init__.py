"""Parsers for GLM-4.7 output text: reasoning (<think>…</think>), content, and tool calls
(<tool_call>name<arg_key>k</arg_key><arg_value>v</arg_value></tool_call>), whole or streamed.
Pure standard-library Python: importable by thin clients and tested without torch."""

from glm47.parsers.deltas import Delta, ToolCallDelta
from glm47.parsers.output import ParsedOutput, ToolCall, parse_output
from glm47.parsers.reasoning import prompt_ends_in_think
from glm47.parsers.stream import OutputStream

__all__ = ["parse_output", "ParsedOutput", "ToolCall", "OutputStream", "Delta", "ToolCallDelta",
           "prompt_ends_in_think"]
