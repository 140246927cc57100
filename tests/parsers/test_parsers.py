"""glm47.parsers: one table of output texts, one row per parsing rule, each checked non-streaming and
streamed in several chunkings (whole, per character, random splits) with identical results."""

import json
import random

import pytest

from glm47.parsers import OutputStream, ParsedOutput, ToolCall, parse_output, prompt_ends_in_think
from parser_util import TOOLS, assemble, call, call_id, streamed


BARE_TOOLS = [{"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def typed(key, text):
    return call("typed", (key, text))


# (id, output text, parse_output kwargs, expected reasoning, content, [(name, arguments as a dict)])
OFF = {"thinking": False, "tools": TOOLS}
ON = {"thinking": True, "tools": TOOLS}
CASES = [
    # reasoning
    ("reasoning_then_content", "Let me think.</think>The answer is 4.", ON, "Let me think.", "The answer is 4.", []),
    ("no_think_close_is_all_reasoning", "Still thinking when the length ran out", ON,
     "Still thinking when the length ran out", None, []),
    ("tool_call_ends_reasoning", "Need the weather." + call("get_weather", ("city", "Paris")), ON,
     "Need the weather.", None, [("get_weather", {"city": "Paris"})]),
    ("tool_call_tag_in_reasoning_prose_stays_reasoning", "Use <tool_call> tags.</think>Ok.", ON,
     "Use <tool_call> tags.", "Ok.", []),
    ("content_after_call_that_ended_reasoning", "Hmm." + call("list_files") + "Done.", ON, "Hmm.", "Done.",
     [("list_files", {})]),
    ("thinking_off_is_all_content", "Hello there.", OFF, None, "Hello there.", []),
    ("thinking_off_stray_think_is_reasoning", "<think>abc</think>hello", OFF, "abc", "hello", []),
    ("thinking_off_bare_close_dropped", "</think>hello", OFF, None, "hello", []),
    ("thinking_off_unclosed_think_is_reasoning", "hi<think>abc", OFF, "abc", "hi", []),
    ("thinking_on_repeated_open_dropped", "<think>abc</think>hi", ON, "abc", "hi", []),
    ("think_tags_after_content_split_out", "r</think>a<think>b</think>c</think>d", ON, "rb", "acd", []),
    ("blank_reasoning_is_none", "</think>Answer", ON, None, "Answer", []),
    ("blank_content_is_none", "Thought.</think>\n\n", ON, "Thought.", None, []),
    # tool-call forms
    ("glm47_inline_form", call("get_weather", ("city", "Paris"), ("days", "3")), OFF, None, None,
     [("get_weather", {"city": "Paris", "days": 3})]),
    ("glm45_newline_form",
     "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n</tool_call>", OFF,
     None, None, [("get_weather", {"city": "Paris"})]),
    ("name_and_key_stripped",
     "<tool_call> get_weather \n<arg_key> city </arg_key><arg_value>Paris</arg_value></tool_call>", OFF,
     None, None, [("get_weather", {"city": "Paris"})]),
    ("tools_without_function_wrapper", call("get_weather", ("city", "Oslo")),
     {"thinking": False, "tools": BARE_TOOLS}, None, None, [("get_weather", {"city": "Oslo"})]),
    ("unknown_tool_dropped", "Hi " + call("rm_rf", ("path", "/")) + "bye", OFF, None, "Hi bye", []),
    ("tools_none_accepts_any_call_untyped", call("anything", ("x", "1"), ("y", "word")), {"thinking": False},
     None, None, [("anything", {"x": 1, "y": "word"})]),
    ("empty_tools_list_accepts_none", "a" + call("get_weather", ("city", "P")), {"thinking": False, "tools": []},
     None, "a", []),
    ("text_before_between_after_calls_kept",
     "Before " + call("get_weather", ("city", "A")) + " between " + call("list_files") + " after", OFF,
     None, "Before  between  after", [("get_weather", {"city": "A"}), ("list_files", {})]),
    ("three_calls", call("list_files") + "\n" + call("get_weather", ("city", "B")) + "\n" + call("list_files"), OFF,
     None, None, [("list_files", {}), ("get_weather", {"city": "B"}), ("list_files", {})]),
    ("zero_arg_call_is_empty_object", call("list_files"), OFF, None, None, [("list_files", {})]),
    ("key_without_value_dropped", "<tool_call>get_weather<arg_key>city</arg_key></tool_call>", OFF, None, None,
     [("get_weather", {})]),
    ("unicode_kept_unescaped", call("get_weather", ("city", "Zürich 東京 🌧")), OFF, None, None,
     [("get_weather", {"city": "Zürich 東京 🌧"})]),
    ("markers_inside_a_string_value_are_text",
     call("write_file", ("path", "a.md"), ("content", "x <think> y <tool_call>f</tool_call> </arg_key>\n")), OFF,
     None, None, [("write_file", {"path": "a.md", "content": "x <think> y <tool_call>f</tool_call> </arg_key>\n"})]),
    ("string_value_whitespace_kept", call("write_file", ("content", "\n  body\n")), OFF, None, None,
     [("write_file", {"content": "\n  body\n"})]),
    # value typing
    ("string_param_digits_stay_string", call("get_weather", ("city", "12345")), OFF, None, None,
     [("get_weather", {"city": "12345"})]),
    ("string_param_quotes_literal", call("get_weather", ("city", '"Paris"')), OFF, None, None,
     [("get_weather", {"city": '"Paris"'})]),
    ("integer", typed("i", "42"), OFF, None, None, [("typed", {"i": 42})]),
    ("number", typed("n", "2.5"), OFF, None, None, [("typed", {"n": 2.5})]),
    ("boolean", typed("b", "true"), OFF, None, None, [("typed", {"b": True})]),
    ("object", typed("o", '{"k": [1, "v"]}'), OFF, None, None, [("typed", {"o": {"k": [1, "v"]}})]),
    ("array", typed("a", '[1, "x", null]'), OFF, None, None, [("typed", {"a": [1, "x", None]})]),
    ("backslash_escapes_undone_on_retry", typed("o", '{\\"k\\": \\"v\\"}'), OFF, None, None,
     [("typed", {"o": {"k": "v"}})]),
    ("undecodable_falls_back_to_raw_string", typed("i", "three"), OFF, None, None, [("typed", {"i": "three"})]),
    ("nan_and_infinity_are_not_json", typed("n", "NaN") + typed("n", "1e999"), OFF, None, None,
     [("typed", {"n": "NaN"}), ("typed", {"n": "1e999"})]),
    ("untyped_param_decoded_when_it_parses", typed("u", "[1, 2]") + typed("u", "hello"), OFF, None, None,
     [("typed", {"u": [1, 2]}), ("typed", {"u": "hello"})]),
    ("param_not_in_schema_is_untyped", typed("extra", "7"), OFF, None, None, [("typed", {"extra": 7})]),
    ("type_list_string_null", typed("ns", "null") + typed("ns", "nul") + typed("ns", "null pointer"), OFF,
     None, None, [("typed", {"ns": None}), ("typed", {"ns": "nul"}), ("typed", {"ns": "null pointer"})]),
    ("type_list_integer_string", typed("mixed", "12") + typed("mixed", "abc") + typed("mixed", '"q"'), OFF,
     None, None, [("typed", {"mixed": 12}), ("typed", {"mixed": "abc"}), ("typed", {"mixed": '"q"'})]),
    ("any_of", typed("any_int", "null") + typed("any_int", "5"), OFF, None, None,
     [("typed", {"any_int": None}), ("typed", {"any_int": 5})]),
    ("one_of_string_null", typed("one_str", "007"), OFF, None, None, [("typed", {"one_str": "007"})]),
    ("openapi_nullable", typed("nullable_num", "null") + typed("nullable_num", "1.5"), OFF, None, None,
     [("typed", {"nullable_num": None}), ("typed", {"nullable_num": 1.5})]),
    ("enum_of_strings_is_string", typed("enum", "true"), OFF, None, None, [("typed", {"enum": "true"})]),
    # malformed and cut off: never an error
    ("call_cut_before_its_name_ended_is_content", "Sure. <tool_call>get_wea", OFF, None,
     "Sure. <tool_call>get_wea", []),
    ("unknown_call_cut_off_is_content", "x" + "<tool_call>rm<arg_key>a</arg_key>", OFF, None,
     "x<tool_call>rm<arg_key>a</arg_key>", []),
    ("tool_call_in_prose_is_content", "Wrap it in <tool_call> tags, then </tool_call>.", OFF, None,
     "Wrap it in <tool_call> tags, then </tool_call>.", []),
    ("empty_name_is_content", "<tool_call></tool_call>", OFF, None, "<tool_call></tool_call>", []),
    ("stray_tool_markers_are_content", "a </arg_value> b <arg_key>", OFF, None, "a </arg_value> b <arg_key>", []),
    ("lone_angle_brackets", "1 < 2 and <b> <", OFF, None, "1 < 2 and <b> <", []),
    ("partial_marker_at_the_end_is_text", "ends with <too", OFF, None, "ends with <too", []),
]

# Calls with a valid name that the end cuts off before </tool_call>: no call, their raw text is content.
CUT_CASES = [
    ("cut_in_value", "Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par", OFF,
     None, "Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_value>Par", []),
    ("cut_after_value", "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n", OFF,
     None, "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n", []),
    ("cut_after_reasoning", "Plan.<tool_call>list_files<arg_key>", ON, "Plan.", "<tool_call>list_files<arg_key>", []),
]


def expected_output(reasoning, content, calls):
    return ParsedOutput(reasoning, content, [ToolCall(call_id(i), name, json.dumps(args, ensure_ascii=False))
                                            for i, (name, args) in enumerate(calls)])


def chunkings(text):
    """Whole, per character, and random splits (several seeds), as a decoder might cut the text."""
    yield "whole", [text]
    yield "chars", list(text)
    for seed in range(4):
        rng, pieces, i = random.Random(seed), [], 0
        while i < len(text):
            n = rng.randint(1, 9)
            pieces.append(text[i:i + n])
            i += n
        yield f"seed{seed}", pieces


@pytest.mark.parametrize("case_id, text, kwargs, reasoning, content, calls", CASES + CUT_CASES,
                         ids=[c[0] for c in CASES + CUT_CASES])
def test_parse_output(case_id, text, kwargs, reasoning, content, calls):
    assert parse_output(text, call_id=call_id, **kwargs) == expected_output(reasoning, content, calls)


@pytest.mark.parametrize("case_id, text, kwargs, reasoning, content, calls", CASES + CUT_CASES,
                         ids=[c[0] for c in CASES + CUT_CASES])
def test_stream_agrees_with_parse_output_in_every_chunking(case_id, text, kwargs, reasoning, content, calls):
    expected = parse_output(text, call_id=call_id, **kwargs)
    for name, pieces in chunkings(text):
        got, _ = streamed(pieces, **kwargs)
        assert got == expected, f"chunking {name}: {pieces}"


@pytest.mark.parametrize("case_id, text, kwargs, reasoning, content, calls", CASES + CUT_CASES,
                         ids=[c[0] for c in CASES + CUT_CASES])
def test_unfinished_parse_is_what_the_stream_has_sent_so_far(case_id, text, kwargs, reasoning, content, calls):
    for cut in range(len(text) + 1):
        stream = OutputStream(call_id=call_id, **kwargs)
        sent = assemble(stream.feed(text[:cut]))
        assert parse_output(text[:cut], finished=False, call_id=call_id, **kwargs) == sent, f"prefix {text[:cut]!r}"


def test_default_ids_are_random_openai_style():
    first, second = (parse_output(call("list_files"), TOOLS, thinking=False).tool_calls[0].id for _ in range(2))
    assert first.startswith("call_") and len(first) == 29 and first != second


@pytest.mark.parametrize("prompt, expected", [
    ("[gMASK]<sop><|user|>hi<|assistant|><think>", True),
    ("[gMASK]<sop><|user|>hi<|assistant|></think>", False),
    ("[gMASK]<sop><|user|>hi<|assistant|>", False),
    ("<|assistant|><think>\n", True),
])
def test_prompt_ends_in_think(prompt, expected):
    assert prompt_ends_in_think(prompt) is expected
