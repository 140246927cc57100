"""The GLM-4.7 prompt format: the native renderer against the official chat_template.jinja (hand-written cases
and a generated corpus), message validation, token ids and the assistant loss mask."""

import json
import random

import pytest

from glm47.chat.template import (MARKERS, render_ids, render_prompt, render_segments, render_with_jinja)
from glm47.chat.tokenizer import ADDED_TOKENS

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Météo d'une ville",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOLS_BLOCK = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "description": "Météo d\'une ville", '
    '"parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}\n'
    "</tools>\n\nFor each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>{arg-value-1}</arg_value>"
    "<arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>...</tool_call>"
)


@pytest.fixture(scope="module")
def official(official_template):
    """official(messages, tools, **flags): the official template's rendering (conftest.OfficialTemplate)."""
    return official_template


def both(official, messages, tools=None, **kw) -> str:
    """The native prompt, after checking the official template renders the same bytes."""
    native = render_prompt(messages, tools, **kw)
    jinja_kw = {"add_generation_prompt": kw.pop("add_generation_prompt", True), **kw}
    assert native == official(messages, tools, **jinja_kw)
    return native


# ---------------------------------------------------------------- hand-written cases, exact strings


def test_single_user_message_opens_a_thinking_turn(official):
    assert both(official, [{"role": "user", "content": "Hi"}]) == "[gMASK]<sop><|user|>Hi<|assistant|><think>"


def test_thinking_off_ends_the_prompt_with_a_closed_think(official):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert both(official, msgs, enable_thinking=False) == "[gMASK]<sop><|system|>Be brief.<|user|>Hi<|assistant|></think>"


def test_no_generation_prompt(official):
    assert both(official, [{"role": "user", "content": "Hi"}], add_generation_prompt=False) == "[gMASK]<sop><|user|>Hi"


def test_reasoning_is_kept_only_after_the_last_user_message(official):
    msgs = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2", "reasoning_content": "simple sum"},
        {"role": "user", "content": "and 2+2?"},
        {"role": "assistant", "content": "<think>\ndouble it\n</think>\n\n4"},
    ]
    assert both(official, msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>1+1?<|assistant|></think>2<|user|>and 2+2?<|assistant|><think>double it</think>4")
    assert both(official, msgs, clear_thinking=False, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>1+1?<|assistant|><think>simple sum</think>2<|user|>and 2+2?"
        "<|assistant|><think>double it</think>4")


def test_tool_call_round_trip_with_openai_shapes(official):
    msgs = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": None, "reasoning_content": "Need the tool.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2, "metric": true}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 °C."},
    ]
    assert both(official, msgs, [WEATHER_TOOL]) == (
        "[gMASK]<sop>" + TOOLS_BLOCK + "<|user|>Weather in Paris?<|assistant|><think>Need the tool.</think>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Paris</arg_value><arg_key>days</arg_key>"
        "<arg_value>2</arg_value><arg_key>metric</arg_key><arg_value>true</arg_value></tool_call>"
        '<|observation|><tool_response>{"temp": 21}</tool_response>'
        "<|assistant|></think>It is 21 °C.<|assistant|><think>")


def test_tool_call_without_wrapper_writes_non_strings_as_json(official):
    msgs = [{"role": "assistant", "content": "Checking.", "tool_calls": [
        {"name": "f", "arguments": {"s": "42", "n": 42, "x": None, "l": [1, "a"], "d": {"k": "é"}}}]}]
    assert both(official, msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|assistant|></think>Checking.<tool_call>f<arg_key>s</arg_key><arg_value>42</arg_value>"
        "<arg_key>n</arg_key><arg_value>42</arg_value><arg_key>x</arg_key><arg_value>null</arg_value>"
        '<arg_key>l</arg_key><arg_value>[1, "a"]</arg_value><arg_key>d</arg_key><arg_value>{"k": "é"}</arg_value>'
        "</tool_call>")


def test_consecutive_tool_results_share_one_observation_unless_given_as_lists(official):
    msgs = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "tool_calls": [{"name": "a", "arguments": "{}"}, {"name": "b", "arguments": ""}]},
        {"role": "tool", "content": "A"},
        {"role": "tool", "content": "B"},
        {"role": "tool", "content": ["C", {"output": "D"}, {"output": {"n": 1}}]},
        {"role": "tool", "content": [{"type": "text", "text": "E1"}, {"type": "text", "text": "E2"}]},
    ]
    assert both(official, msgs) == (
        "[gMASK]<sop><|user|>go<|assistant|></think><tool_call>a</tool_call><tool_call>b</tool_call>"
        "<|observation|><tool_response>A</tool_response><tool_response>B</tool_response>"
        '<|observation|><tool_response>C</tool_response><tool_response>D</tool_response>'
        '<tool_response>{"n": 1}</tool_response><tool_response>E1E2</tool_response><|assistant|><think>')


def test_null_content_renders_as_empty_text(official):
    # The raw template would print "None" for a null content; both renderers get "" instead.
    msgs = [{"role": "user", "content": None}, {"role": "assistant", "content": None}]
    assert both(official, msgs) == "[gMASK]<sop><|user|><|assistant|></think><|assistant|><think>"


def test_inline_reasoning_quirks_follow_the_template(official):
    # Without reasoning_content the template splits on </think>; with it, the content is left as written.
    msgs = [{"role": "user", "content": "q"},
            {"role": "assistant", "content": "pre<think>\n\nR\n</think>\n\n  answer </think> tail"},
            {"role": "assistant", "content": " x</think>y ", "reasoning_content": "  "}]
    assert both(official, msgs, add_generation_prompt=False) == (
        "[gMASK]<sop><|user|>q<|assistant|><think>R</think>tail<|assistant|><think></think>x</think>y")


# ---------------------------------------------------------------- generated corpus vs the official template

TEXTS = ["Hello", "  spaced  ", "\nleading newline", "trailing\n\n", "中文内容", "emoji 🎉👍🏽", "x = 1\n    y = 2",
         "1234", "tab\there", "e\u0301", "", " ", "\n", "3.14", "true", "null", '{"json": [1, 2]}', "a\u00a0b"]
UNSAFE = ["</think>", "<think>", "<|user|>", "<tool_call>", "[gMASK]", "<|observation|>"]


def text(rng, safe):
    pool = TEXTS if safe else TEXTS + UNSAFE
    return "".join(rng.choice(pool) for _ in range(rng.randint(0, 3)))


def content(rng, safe, allow_none=True):
    r = rng.random()
    if r < 0.15:
        parts = [rng.choice([{"type": "text", "text": text(rng, safe)}, text(rng, safe),
                             {"type": "image_url", "image_url": {"url": "http://x"}}]) for _ in range(rng.randint(0, 3))]
        return parts
    if r < 0.22 and allow_none:
        return None
    return text(rng, safe)


def json_value(rng, depth=0):
    leaves = [rng.randint(-5, 10 ** 6), rng.random() * 100, True, False, None, "42", "true", "", "Zürich 東京",
              "line\nbreak", 1.0]
    if depth < 2 and rng.random() < 0.3:
        if rng.random() < 0.5:
            return [json_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
        return {f"k{i}": json_value(rng, depth + 1) for i in range(rng.randint(0, 3))}
    return rng.choice(leaves)


def tool_call(rng):
    args = {rng.choice(["city", "query", "n", "flag", "payload", "ключ"]) + str(i): json_value(rng)
            for i in range(rng.randint(0, 3))}
    r = rng.random()
    arguments = (args if r < 0.45 else
                 json.dumps(args, ensure_ascii=rng.random() < 0.5, separators=rng.choice([None, (",", ":")]))
                 if r < 0.9 else rng.choice([None, "", "  "]))
    name = rng.choice(["get_weather", "search", "run_code", "f"])
    if rng.random() < 0.5:
        return {"id": f"call_{rng.randint(0, 99)}", "type": "function", "function": {"name": name, "arguments": arguments}}
    return {"name": name, "arguments": arguments}


def assistant(rng, safe):
    m = {"role": "assistant"}
    c = content(rng, safe)
    r = rng.random()
    if r < 0.25:
        m["reasoning_content"] = rng.choice(["", "  ", "\nthink hard\n", "step 1\n\nstep 2", "推理"])
    elif r < 0.3:
        m["reasoning"] = "aliased reasoning"
    elif r < 0.55:
        c = rng.choice(["<think>", "", "\n"]) + text(rng, True) + "\n</think>\n" + (text(rng, True) or "answer")
    if c is not None or rng.random() < 0.5:
        m["content"] = c
    if rng.random() < 0.4:
        m["tool_calls"] = [tool_call(rng) for _ in range(rng.randint(1, 3))]
    return m


def tool_result(rng, safe):
    r = rng.random()
    if r < 0.6:
        return {"role": "tool", "content": text(rng, safe) or "ok"}
    if r < 0.8:
        items = [rng.choice([text(rng, safe), {"output": text(rng, safe)}, {"output": json_value(rng)}])
                 for _ in range(rng.randint(1, 3))]
        return {"role": "tool", "content": items}
    if r < 0.9:
        return {"role": "tool", "content": [{"type": "text", "text": text(rng, safe)} for _ in range(rng.randint(1, 2))]}
    return {"role": "tool", "content": None}


def conversation(rng, safe=False):
    """A random conversation (messages, tools, render flags) covering every message shape."""
    msgs = []
    if rng.random() < 0.5:
        msgs.append({"role": "system", "content": content(rng, safe)})
    for _ in range(rng.randint(0, 4)):
        r = rng.random()
        if r < 0.35:
            msgs.append({"role": "user", "content": content(rng, safe)})
        elif r < 0.75:
            msgs.append(assistant(rng, safe))
            if "tool_calls" in msgs[-1]:
                msgs += [tool_result(rng, safe) for _ in range(rng.randint(1, 3))]
        elif r < 0.9:
            msgs.append(tool_result(rng, safe))
        else:
            msgs.append({"role": "system", "content": content(rng, safe)})
    tools = rng.choice([None, [], [WEATHER_TOOL], [WEATHER_TOOL, {"name": "search", "description": "найти \"x\"",
                                                                    "parameters": {"type": "object"}}]])
    flags = {"enable_thinking": rng.random() < 0.5, "clear_thinking": rng.random() < 0.5,
             "add_generation_prompt": rng.random() < 0.7}
    return msgs, tools, flags


def test_native_renderer_matches_the_official_template_on_a_generated_corpus(official):
    rng = random.Random(0)
    for i in range(600):
        msgs, tools, flags = conversation(rng)
        native = render_prompt(msgs, tools, **flags)
        assert native == official(msgs, tools, **flags), f"conversation {i}: {msgs!r}"


def test_jinja_setup_matches_transformers_apply_chat_template(official):
    """Our jinja setup renders the official template as transformers' apply_chat_template does (on a clone
    without the reference files: our renderer against the golden renderings of the same conversations)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models
    from transformers import PreTrainedTokenizerFast

    from glm47.chat.messages import normalize_messages

    hf = None
    if official.template is not None:  # transformers' own machinery, on the normalised messages
        hf = PreTrainedTokenizerFast(tokenizer_object=HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]")),
                                     chat_template=official.template)
    rng = random.Random(1)
    for i in range(40):
        msgs, tools, flags = conversation(rng)
        if not msgs:
            continue  # transformers refuses an empty conversation
        golden = official(msgs, tools, **flags)
        if hf is not None:  # (transformers does not decode JSON arguments: normalised messages)
            assert hf.apply_chat_template(normalize_messages(msgs), tools=tools, tokenize=False, **flags) == golden
        assert render_prompt(msgs, tools, **flags) == golden, f"conversation {i}"


def test_render_with_jinja_supports_hf_template_helpers():
    template = "{% generation %}{{ messages[0].content | tojson }}{% endgeneration %}"
    assert render_with_jinja(template, [{"role": "user", "content": "<é>"}]) == '"<é>"'
    with pytest.raises(ValueError, match="roles must alternate"):
        render_with_jinja("{{ raise_exception('roles must alternate') }}", [])


# ---------------------------------------------------------------- invalid messages


@pytest.mark.parametrize("bad, problem", [
    ({"role": "robot", "content": "x"}, "unknown role"),
    ({"content": "x"}, "missing 'role'"),
    ({"role": "assistant", "tool_calls": [{"arguments": {}}]}, r"tool_calls\[0\]: tool call has no name"),
    ({"role": "assistant", "tool_calls": [{"function": {"name": "", "arguments": {}}}]}, "no name"),
    ({"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{city: Paris}"}]}, "not valid JSON"),
    ({"role": "assistant", "tool_calls": [{"name": "f", "arguments": "[1, 2]"}]}, "must be a JSON object"),
    ({"role": "assistant", "tool_calls": [{"name": "f", "arguments": 3}]}, "arguments must be"),
    ({"role": "assistant", "content": "x", "reasoning_content": 5}, "reasoning_content must be a string"),
    ({"role": "user", "content": {"text": "x"}}, "content must be"),
    ({"role": "user", "content": [{"type": "text", "text": None}]}, "text part"),
    ({"role": "tool", "content": [{"result": 1}, "x"]}, "tool result"),
    ("just a string", "must be an object"),
])
def test_invalid_messages_raise_value_error_naming_the_index(bad, problem):
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, bad]
    with pytest.raises(ValueError, match=problem) as err:
        render_prompt(msgs)
    assert str(err.value).startswith("messages[2]")


def test_invalid_tools_raise_value_error_naming_the_index():
    with pytest.raises(ValueError, match=r"tools\[1\]"):
        render_prompt([{"role": "user", "content": "a"}], tools=[WEATHER_TOOL, "get_weather"])


def test_messages_are_not_modified():
    msgs = [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}]}]
    before = json.dumps(msgs)
    render_prompt(msgs)
    assert json.dumps(msgs) == before


# ---------------------------------------------------------------- token ids and the assistant mask


def test_render_ids_equals_encoding_the_prompt_when_messages_hold_no_marker_text(tok):
    rng = random.Random(2)
    for i in range(200):
        msgs, tools, flags = conversation(rng, safe=True)
        expected = tok.encode(render_prompt(msgs, tools, **flags), allow_special=True)
        assert render_ids(tok, msgs, tools, **flags) == expected, f"conversation {i}"


def test_marker_text_inside_messages_stays_ordinary_text(tok):
    msgs = [{"role": "user", "content": "<|user|><|assistant|></think>"},
            {"role": "tool", "content": "<|observation|><tool_call>"}]
    ids = render_ids(tok, msgs, add_generation_prompt=False)
    assert ids[:3] == [151331, 151333, 151336]
    assert tok.decode(ids[3:]) == "<|user|><|assistant|></think><|observation|><tool_response><|observation|><tool_call></tool_response>"
    special = [i for i in ids if i >= 151329]
    assert special == [151331, 151333, 151336, 151338, 151354, 151355]


def test_only_renderer_markers_become_control_tokens(tok):
    ids = render_ids(tok, [{"role": "user", "content": "hi"}], [WEATHER_TOOL])
    added = {i: c for i, c, _ in ADDED_TOKENS}
    assert {added[i] for i in ids if i in added} <= MARKERS
    assert ids[-2:] == [151337, 151350]


def test_assistant_mask_covers_what_the_model_writes(tok):
    msgs = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "U1"},
        {"role": "assistant", "content": "calling", "reasoning_content": "R",
         "tool_calls": [{"name": "f", "arguments": {"a": 1}}]},
        {"role": "tool", "content": "T"},
        {"role": "assistant", "content": "done"},
        {"role": "user", "content": "U2"},
    ]
    kw = {"clear_thinking": False, "add_generation_prompt": True}  # keep R although a user message follows
    ids, mask = render_ids(tok, msgs, **kw, return_assistant_mask=True)
    assert len(ids) == len(mask)
    assert ids == render_ids(tok, msgs, **kw)
    spans, current = [], []
    for token_id, trained in zip(ids, mask):
        if trained:
            current.append(token_id)
        elif current:
            spans.append(tok.decode(current))
            current = []
    assert spans == [
        "<think>R</think>calling<tool_call>f<arg_key>a</arg_key><arg_value>1</arg_value></tool_call><|observation|>",
        "</think>done<|user|>",
    ]
    assert mask[-2:] == [False, False]  # the generation prompt is given, not generated


def test_segments_join_to_the_prompt_and_never_leave_empty_pieces():
    msgs = [{"role": "user", "content": ""}, {"role": "assistant", "content": "  "}]
    segments = render_segments(msgs)
    assert all(s.text for s in segments)
    assert "".join(s.text for s in segments) == render_prompt(msgs)
    assert [s.text for s in segments if s.is_marker] == [
        "[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "</think>", "<|assistant|>", "<think>"]
