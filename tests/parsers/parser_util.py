"""What the parser tests share: the tools of the test tables, a tool call as the template renders it, and a
client's view of a stream (its deltas assembled)."""

from glm47.parsers import OutputStream, ParsedOutput, ToolCall


def fn(name, properties):
    schema = {"type": "object", "properties": properties}
    return {"type": "function", "function": {"name": name, "parameters": schema}}


TOOLS = [
    fn("get_weather", {"city": {"type": "string"}, "days": {"type": "integer"}}),
    fn("list_files", {}),
    fn("write_file", {"path": {"type": "string"}, "content": {"type": "string"}}),
    fn("typed", {
        "s": {"type": "string"}, "i": {"type": "integer"}, "n": {"type": "number"}, "b": {"type": "boolean"},
        "o": {"type": "object"}, "a": {"type": "array"}, "u": {"description": "no type"},
        "ns": {"type": ["string", "null"]}, "mixed": {"type": ["integer", "string"]},
        "any_int": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
        "one_str": {"oneOf": [{"type": "string"}, {"type": "null"}]},
        "nullable_num": {"type": "number", "nullable": True},
        "enum": {"enum": ["a", "b"]},
    }),
]
def call(name, *pairs):
    """A tool call as the template renders it: `pairs` are (key, already-rendered value text)."""
    args = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in pairs)
    return f"<tool_call>{name}{args}</tool_call>"


def call_id(index):
    return f"call_{index}"


def streamed(pieces, **kwargs):
    """What a client assembling the stream's deltas ends up with, as a ParsedOutput."""
    stream = OutputStream(call_id=call_id, **kwargs)
    deltas = [d for p in pieces for d in stream.feed(p)] + stream.close()
    return assemble(deltas), stream


def assemble(deltas):
    reasoning, content, calls = "", "", {}
    for d in deltas:
        reasoning += d.reasoning_content or ""
        content += d.content or ""
        for tc in d.tool_calls or ():
            if tc.id is not None:
                calls[tc.index] = ToolCall(tc.id, tc.name, "")
            calls[tc.index].arguments += tc.arguments
    return ParsedOutput(reasoning or None, content or None, [calls[i] for i in sorted(calls)])
