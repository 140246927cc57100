"""glm47.parsers.OutputStream: what a client sees while the output is generated (a call only once it is
closed, never a cut-off one; no half markers; the OpenAI delta shape), and properties over generated text."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glm47.parsers import OutputStream, parse_output
from parser_util import TOOLS, assemble, call, call_id, fn, streamed

BODY = "".join(f"line {i}: \"quoted\" \\ tab\t ünïcødé\n" for i in range(200))[:4000]


def calls_in(deltas):
    """(index, id, name, arguments) of every call delta, in order."""
    return [(tc.index, tc.id, tc.name, tc.arguments) for d in deltas for tc in d.tool_calls or ()]


def test_a_complete_call_is_sent_only_once_its_close_has_been_fed():
    """A long file body sends nothing while it is written; the character that completes </tool_call>
    sends the header and then the whole arguments."""
    stream = OutputStream(TOOLS, thinking=False, call_id=call_id)
    assert [d.content for d in stream.feed("Writing it.")] == ["Writing it."]
    text = call("write_file", ("path", "a.txt"), ("content", BODY))
    for i, char in enumerate(text[:-1]):
        assert stream.feed(char) == [], f"sent at char {i} of {len(text)}: {text[max(0, i - 20):i + 1]!r}"
    arguments = json.dumps({"path": "a.txt", "content": BODY}, ensure_ascii=False)
    assert calls_in(stream.feed(text[-1])) == [(0, "call_0", "write_file", ""), (0, None, None, arguments)]
    assert stream.close() == [] and stream.num_tool_calls == 1


def test_each_call_is_sent_by_the_feed_that_completes_its_close():
    text = "Checking." + call("get_weather", ("city", "Paris")) + " and " + call("list_files") + " done"
    closes = [i + len("</tool_call>") - 1 for i in range(len(text)) if text.startswith("</tool_call>", i)]
    stream = OutputStream(TOOLS, thinking=False, call_id=call_id)
    sent_at = [(i, index) for i, char in enumerate(text) for index, *_ in calls_in(stream.feed(char))]
    assert sent_at == [(closes[0], 0), (closes[0], 0), (closes[1], 1), (closes[1], 1)], (sent_at, closes)


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
    """First delta per call: index, id, whole name, arguments ""; then one with index and the whole arguments."""
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
        for index, arguments in ((0, '{"city": "Paris", "days": 2}'), (1, "{}")):
            mine = [(p.id, p.name, p.arguments) for p in parts if p.index == index]
            assert mine == [(f"call_{index}", headers[index].name, ""), (None, None, arguments)]
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


FIRST = call("get_weather", ("city", "Paris"))
SECOND = call("write_file", ("path", "a.txt"), ("content", "line 1\nline <2> </arg_key>\n"))
TWO_CALLS = "Sure. " + FIRST + " Now the file.\n" + SECOND
SECOND_AT = len(TWO_CALLS) - len(SECOND)


def check_cut_call(text, pieces):
    """The stream fed `pieces` (joined: `text`, cut inside SECOND) sent FIRST and no other call, and all it
    sent adds up to parse_output(text), where the cut call's raw text is content."""
    stream = OutputStream(TOOLS, thinking=False, call_id=call_id)
    deltas = [d for p in pieces for d in stream.feed(p)] + stream.close()
    expected = parse_output(text, TOOLS, thinking=False, call_id=call_id)
    assert {index for index, *_ in calls_in(deltas)} == {0}, (text, pieces, calls_in(deltas))
    assert stream.num_tool_calls == 1
    assert assemble(deltas) == expected, (text, pieces)
    assert [c.name for c in expected.tool_calls] == ["get_weather"]
    assert expected.content == "Sure.  Now the file.\n" + text[SECOND_AT:], text


@pytest.mark.parametrize("where, cut", [
    ("inside_the_name", SECOND_AT + len("<tool_call>write_f")),
    ("right_after_the_name", SECOND_AT + len("<tool_call>write_file")),
    ("inside_an_arg_key", SECOND_AT + SECOND.index("<arg_key>pa") + len("<arg_key>pa")),
    ("inside_an_arg_value", SECOND_AT + SECOND.index("line <2") + len("line <2")),
    ("inside_a_marker", SECOND_AT + SECOND.index("</arg_value>") + len("</arg_v")),
    ("right_before_the_close", len(TWO_CALLS) - len("</tool_call>")),
    ("inside_the_close", len(TWO_CALLS) - 1),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_call_cut_before_its_close_streams_no_call_and_becomes_content_as_whole(where, cut):
    text = TWO_CALLS[:cut]
    for name, pieces in (("whole", [text]), ("chars", list(text)), *(
            (f"split at {i}", [text[:i], text[i:]]) for i in range(1, len(text)))):
        check_cut_call(text, pieces)


def test_a_call_cut_at_any_point_streams_no_call_and_becomes_content_as_whole():
    """max_tokens or a stop string can end the output anywhere inside a call."""
    for cut in range(SECOND_AT + 1, len(TWO_CALLS)):
        text = TWO_CALLS[:cut]
        check_cut_call(text, list(text))
        check_cut_call(text, [text[:SECOND_AT], text[SECOND_AT:]])


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
    assert got == expected  # cut-off text included: a call the end cuts off is content in both
    assert stream.num_tool_calls == len(got.tool_calls)
    for c in got.tool_calls:
        assert isinstance(json.loads(c.arguments), dict), c  # every call sent is whole: a JSON object


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
