"""glm47.parsers.OutputStream: what a client sees while the output is generated (argument fragments
before </arg_value>, no half markers, the OpenAI delta shape), and properties over generated text."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm47.parsers import OutputStream, parse_output
from test_parsers import TOOLS, assemble, call, call_id, fn, streamed

BODY = "".join(f"line {i}: \"quoted\" \\ tab\t ünïcødé\n" for i in range(200))[:4000]


def test_long_string_argument_streams_before_its_closing_tag():
    stream = OutputStream(TOOLS, thinking=False, call_id=call_id)
    head = "<tool_call>write_file" + "<arg_key>path</arg_key><arg_value>a.txt</arg_value>" \
        + "<arg_key>content</arg_key><arg_value>"
    sent = "".join(tc.arguments for d in stream.feed(head) for tc in d.tool_calls or ())
    assert sent == '{"path": "a.txt", "content": "'  # the opening is out before any of the body
    for i in range(0, len(BODY), 16):
        sent += "".join(tc.arguments for d in stream.feed(BODY[i:i + 16]) for tc in d.tool_calls or ())
        # each piece goes out, JSON-escaped, as soon as it arrives: all but the closing '"}' is there
        assert sent == json.dumps({"path": "a.txt", "content": BODY[:i + 16]}, ensure_ascii=False)[:-2], i
    rest = stream.feed("</arg_value></tool_call>") + stream.close()
    assert "".join(tc.arguments for d in rest for tc in d.tool_calls or ()) == '"}'


@pytest.mark.parametrize("before, partial, after, thinking", [
    ("Sure. ", "<too", "l_call>list_files</tool_call>", False),
    ("Thinking ", "</thi", "nk>Answer", True),
    ("a", "<", "think>b</think>c", False),
    ("<tool_call>get_weather<arg_key>city</arg_key>", "<arg_v", "alue>Paris</arg_value></tool_call>", False),
    ("<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par", "</arg_va", "lue></tool_call>", False),
])
def test_partial_marker_at_a_chunk_edge_is_never_leaked(before, partial, after, thinking):
    stream = OutputStream(TOOLS, thinking=thinking, call_id=call_id)
    early = stream.feed(before) + stream.feed(partial)
    for d in early:
        for text in (d.content, d.reasoning_content, *(tc.arguments for tc in d.tool_calls or ())):
            assert partial not in (text or ""), d
    deltas = early + stream.feed(after) + stream.close()
    assert assemble(deltas) == parse_output(before + partial + after, TOOLS, thinking, call_id=call_id)


def test_partial_marker_that_never_completes_is_flushed_by_close():
    stream = OutputStream(thinking=False)
    assert [d.content for d in stream.feed("x <tool_ca")] == ["x "]
    assert [d.content for d in stream.close()] == ["<tool_ca"]


def test_call_deltas_have_the_openai_shape():
    """First delta per call: index, id, whole name, arguments ""; then fragments with index only."""
    text = "Checking." + call("get_weather", ("city", "Paris"), ("days", "2")) + call("list_files")
    for pieces in ([text], list(text)):
        stream = OutputStream(TOOLS, thinking=False, call_id=call_id)
        deltas = [d for p in pieces for d in stream.feed(p)] + stream.close()
        parts = [d.tool_calls[0] for d in deltas if d.tool_calls]
        assert all(len(d.tool_calls) == 1 for d in deltas if d.tool_calls)
        assert all([d.content, d.reasoning_content, d.tool_calls].count(None) == 2 for d in deltas)
        headers = [p for p in parts if p.id is not None]
        assert [(h.index, h.id, h.name, h.arguments) for h in headers] == [
            (0, "call_0", "get_weather", ""), (1, "call_1", "list_files", "")]
        for index in (0, 1):
            mine = [p for p in parts if p.index == index]
            assert mine[0].id is not None and all(p.id is None and p.name is None and p.arguments for p in mine[1:])
        assert "".join(p.arguments for p in parts if p.index == 1) == "{}"  # sent even with no arguments
        assert stream.num_tool_calls == 2


def test_markers_in_one_chunk_lose_nothing():
    """Speculative decoding can deliver several tokens, so several markers, in one piece."""
    text = "r</think>c" + call("get_weather", ("city", "X")) + "<think>r2</think>" + call("list_files") + "end"
    stream = OutputStream(TOOLS, thinking=True, call_id=call_id)
    got = assemble(stream.feed(text) + stream.close())
    assert (got.reasoning_content, got.content) == ("rr2", "cend")
    assert [(c.name, c.arguments) for c in got.tool_calls] == [("get_weather", '{"city": "X"}'), ("list_files", "{}")]


def test_blank_text_is_held_until_something_visible_follows():
    stream = OutputStream(TOOLS, thinking=False, call_id=call_id)
    assert stream.feed("\n\n") == []
    assert [d.content for d in stream.feed(" Hi")] == ["\n\n Hi"]
    stream = OutputStream(TOOLS, thinking=False, call_id=call_id)
    deltas = stream.feed("\n" + call("list_files") + "\n") + stream.close()
    assert all(d.content is None for d in deltas)


def test_call_cut_off_after_it_was_announced():
    """The stream cannot take back the call it announced: it stops, with the arguments left open, and names
    the call in truncated_call; parse_output turns the same text into content."""
    text = "Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par"
    got, stream = streamed(list(text), tools=TOOLS, thinking=False)
    assert got.content == "Sure."
    assert [(c.name, c.arguments) for c in got.tool_calls] == [("get_weather", '{"city": "Par')]
    assert stream.truncated_call == 0
    parsed = parse_output(text, TOOLS, thinking=False)
    assert parsed.content == text and parsed.tool_calls == []


def test_feed_after_close_is_a_caller_error():
    stream = OutputStream()
    stream.close()
    with pytest.raises(RuntimeError):
        stream.feed("x")
    assert stream.close() == []


# --- properties over generated text -------------------------------------------------------------------

MARKERS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>",
           "</arg_value>"]
FRAGMENTS = MARKERS + [m[:k] for m in MARKERS for k in (2, 5)] + [
    "get_weather", "list_files", "typed", "city", "days", "o", "ns", "mixed", "Paris", "12", "null", '{"a": 1}',
    '{\\"a\\": 1}', "[1,", "NaN", "1e999", " ", "\n", "<", ">", '"', "\\", "é", "🌧"]
noise = st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=12).map("".join)
VALUE_TEXTS = ["Paris", "12", "null", "nul", '{"a": 1}', '{\\"a\\": 1}', "[1,", "NaN", "true", "", " x\n", "é🌧"]


@st.composite
def model_like_text(draw):
    """Text, think tags and tool calls (known, unknown, untyped keys), sometimes damaged: a marker dropped,
    noise spliced in, or the text cut short, so cut-off and malformed calls come up often."""
    segments = []
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["noise", "call", "call", "think"]))
        if kind == "noise":
            segments.append(draw(noise))
        elif kind == "think":
            segments.append(draw(st.sampled_from(["<think>", "</think>"])))
        else:
            name = draw(st.sampled_from(["get_weather", "list_files", "typed", "unknown_tool", " typed\n", ""]))
            keys = draw(st.lists(st.sampled_from(["city", "days", "o", "ns", "mixed", "i", "u", " s "]), max_size=3))
            segments.append(call(name, *[(k, draw(st.sampled_from(VALUE_TEXTS))) for k in keys]))
    text = "".join(segments)
    if text and draw(st.booleans()):
        for marker in draw(st.lists(st.sampled_from(MARKERS), max_size=2)):
            text = text.replace(marker, draw(st.sampled_from(["", marker[:-1], marker + marker])), 1)
    if text and draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return text


cuts = st.lists(st.integers(min_value=1, max_value=12), max_size=40)


def split(text, sizes):
    pieces, i = [], 0
    for n in sizes:
        pieces.append(text[i:i + n])
        i += n
    return pieces + [text[i:]]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.one_of(model_like_text(), st.text(max_size=60)), sizes=cuts, thinking=st.booleans(),
       tools=st.sampled_from([TOOLS, None, []]))
def test_no_text_makes_the_parsers_raise_and_streaming_agrees(text, sizes, thinking, tools):
    expected = parse_output(text, tools, thinking, call_id=call_id)
    parse_output(text, tools, thinking, finished=False)
    got, stream = streamed(split(text, sizes), tools=tools, thinking=thinking)
    if stream.truncated_call is None:
        assert got == expected
    else:  # the one documented difference: the cut call is in the stream, its text in parse_output
        assert got.tool_calls[:-1] == expected.tool_calls and got.reasoning_content == expected.reasoning_content
        rest = expected.content[len(got.content or ""):]  # whitespace the stream held back, then the raw call
        assert expected.content.startswith(got.content or "") and rest.lstrip().startswith("<tool_call>")
    for c in got.tool_calls[: len(got.tool_calls) - (stream.truncated_call is not None)]:
        json.loads(c.arguments)  # every finished call's arguments are valid JSON


# Argument values the template can render and a schema can type: text without marker pieces.
plain = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(lambda s: "</" not in s)
finite = st.floats(allow_nan=False, allow_infinity=False)
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(), finite, plain)
json_value = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                             st.dictionaries(plain, inner, max_size=3)), max_leaves=6)
TYPED_VALUES = {
    "string": plain, "integer": st.integers(), "number": finite,
    "boolean": st.booleans(), "null": st.none(),
    "object": st.dictionaries(plain, json_value, max_size=3), "array": st.lists(json_value, max_size=3),
}
identifier = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True)


@st.composite
def tool_and_args(draw):
    keys = draw(st.lists(identifier, unique=True, max_size=5))
    types = [draw(st.sampled_from(sorted(TYPED_VALUES))) for _ in keys]
    args = {k: draw(TYPED_VALUES[t]) for k, t in zip(keys, types)}
    name = draw(identifier)
    return fn(name, {k: {"type": t} for k, t in zip(keys, types)}), name, args


def render_tool_call(name, args):
    """The call as the package's prompt renderer writes it in an assistant turn (strings raw, else JSON)."""
    from glm47.chat import render_prompt

    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name, "arguments": args}}]}]
    turn = render_prompt(messages, add_generation_prompt=False).rpartition("<|assistant|>")[2]
    assert turn.startswith("</think><tool_call>"), turn
    return turn.removeprefix("</think>")


@settings(max_examples=200, deadline=None)
@given(spec=tool_and_args(), sizes=cuts)
def test_rendered_call_parses_back_to_the_same_typed_arguments(spec, sizes):
    tool, name, args = spec
    text = render_tool_call(name, args)
    parsed = parse_output(text, [tool], thinking=False, call_id=call_id)
    assert [c.name for c in parsed.tool_calls] == [name] and parsed.content is None
    assert json.loads(parsed.tool_calls[0].arguments) == args
    assert parsed.tool_calls[0].arguments == json.dumps(args, ensure_ascii=False)
    got, _ = streamed(split(text, sizes), tools=[tool], thinking=False)
    assert got == parsed
