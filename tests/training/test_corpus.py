"""The synthetic agent corpus: reproducible by seed, every kind present, held-out values never seen in
training, tool results equal to the real tools' output, and every reference assistant turn renders in the
GLM-4.7 format and parses back to the same reasoning, content and tool calls."""

import json
import re
from collections import Counter

import pytest

from glm47.chat import render_prompt
from glm47.parsers import parse_output
from glm47.tools import WEATHER, run_tool
from glm47.training.corpus import KINDS, Example, generate_examples, render_example, split_of, training_text
from glm47.training.corpus_turns import NAMES, UNKNOWN_CITIES


@pytest.fixture(scope="module")
def train():
    return generate_examples(200, seed=0)


@pytest.fixture(scope="module")
def heldout():
    return generate_examples(200, seed=0, split="heldout")


def test_same_seed_gives_the_same_examples_and_another_seed_does_not():
    a, b = generate_examples(30, seed=7), generate_examples(30, seed=7)
    assert a == b
    assert generate_examples(30, seed=8) != a
    assert generate_examples(10, seed=7) == a[:10]  # example i depends only on (seed, split, i)


def test_every_kind_is_present_in_a_batch_of_200(train, heldout):
    for examples in (train, heldout):
        counts = Counter(e.kind for e in examples)
        assert set(counts) == set(KINDS), counts
        assert min(counts.values()) >= 5, counts


def test_the_last_user_turn_is_answered_with_the_expected_calls_and_the_answer(train, heldout):
    for ex in train + heldout:
        last_user = max(i for i, m in enumerate(ex.messages) if m["role"] == "user")
        turn = ex.messages[last_user + 1:]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for m in turn for c in m.get("tool_calls", ())]
        assert calls == ex.expected_calls, ex
        final = turn[-1]
        assert final["role"] == "assistant" and "tool_calls" not in final
        assert ex.answer and ex.answer in final["content"], (ex.answer, final["content"])
        # Thinking on: every assistant message of the turn reasons; off: none has reasoning_content.
        assert all(("reasoning_content" in m) == ex.enable_thinking for m in turn if m["role"] == "assistant"), ex
        assert (ex.kind == "thinking_off") <= (not ex.enable_thinking)
        assert (ex.kind in ("tool", "multi_tool", "tool_error")) <= bool(ex.expected_calls)
        assert (ex.kind == "no_tool") <= (not ex.expected_calls)
        assert len(ex.expected_calls) >= 2 if ex.kind == "multi_tool" else True


def test_tool_messages_hold_the_real_tools_results(train):
    for ex in train:
        pending = []
        for m in ex.messages:
            if m["role"] == "assistant":
                pending = [c["function"] for c in m.get("tool_calls", ())]
            elif m["role"] == "tool":
                call = pending.pop(0)
                assert m["content"] == run_tool(call["name"], call["arguments"]), (call, m)
        errors = [m["content"] for m in ex.messages if m["role"] == "tool" and m["content"].startswith("error")]
        assert not errors or ex.kind in ("tool_error", "multi_turn", "thinking_off"), (ex.kind, errors)


def test_offered_tools_include_every_tool_the_conversation_calls(train):
    for ex in train:
        called = {c["function"]["name"] for m in ex.messages for c in m.get("tool_calls", ())}
        offered = {t["function"]["name"] for t in ex.tools or ()}
        assert called <= offered, (called, offered)
    assert any(ex.tools is None for ex in train) and any(ex.tools and len(ex.tools) == 5 for ex in train)


def test_multi_turn_examples_include_preserved_thinking(train):
    multi = [ex for ex in train if ex.kind == "multi_turn"]
    assert all(sum(m["role"] == "user" for m in ex.messages) >= 2 for ex in multi)
    preserved = [ex for ex in multi if not ex.clear_thinking]
    assert preserved
    # Preserved: the first turn's reasoning is in the prompt even though a later user message follows it.
    ex = next(ex for ex in preserved if "reasoning_content" in _first_assistant(ex))
    assert f"<think>{_first_assistant(ex)['reasoning_content']}</think>" in render_example(ex)


def _first_assistant(ex: Example) -> dict:
    return next(m for m in ex.messages if m["role"] == "assistant")


def _reply_text(ex: Example, i: int) -> tuple[str, bool]:
    """What the model writes for assistant message i, after the prompt that precedes it."""
    kw = dict(enable_thinking=ex.enable_thinking, clear_thinking=ex.clear_thinking)
    prompt = render_prompt(ex.messages[:i], ex.tools, **kw)
    full = render_prompt(ex.messages[: i + 1], ex.tools, add_generation_prompt=False, **kw)
    head = prompt[: -len("<think>")] if prompt.endswith("<think>") else prompt[: -len("</think>")]
    assert full.startswith(head)
    reply = full[len(head):]
    thinking = reply.startswith("<think>")
    return reply.removeprefix("<think>" if thinking else "</think>"), thinking


def test_reference_turns_render_and_parse_back_to_the_same_calls(train, heldout):
    for ex in train[:120] + heldout[:80]:
        for i, m in enumerate(ex.messages):
            if m["role"] != "assistant":
                continue
            reply, thinking = _reply_text(ex, i)
            assert thinking == ("reasoning_content" in m)
            parsed = parse_output(reply, ex.tools, thinking=thinking)
            calls = [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]
            assert calls == [(c["function"]["name"], c["function"]["arguments"]) for c in m.get("tool_calls", ())]
            assert (parsed.content or "") == m["content"]
            assert parsed.reasoning_content == m.get("reasoning_content")


def test_example_renders_in_the_glm47_format():
    ex = next(e for e in generate_examples(40, seed=3) if e.kind == "tool" and e.tools)
    text = render_example(ex)
    name, args = ex.expected_calls[0]
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools")
    assert f"<tool_call>{name}<arg_key>" in text and "<|observation|><tool_response>" in text
    assert text.endswith(ex.messages[-1]["content"])
    assert list(training_text([ex])) == [text]


def _typed_values(examples: list[Example]) -> set[str]:
    """Every date, number, city and name a user typed."""
    values = set()
    for ex in examples:
        for m in ex.messages:
            if m["role"] != "user":
                continue
            text = m["content"]
            dates = re.findall(r"\d{4}-\d{2}-\d{2}", text)
            values.update(dates)
            values.update(re.findall(r"\d+(?:\.\d+)?", re.sub(r"\d{4}-\d{2}-\d{2}", " ", text)))
            values.update(w for w in [*WEATHER, *UNKNOWN_CITIES, *NAMES] if re.search(rf"\b{re.escape(w)}\b", text))
    return values


def test_heldout_values_never_appear_in_training_examples(train, heldout):
    seen, unseen = _typed_values(train), _typed_values(heldout)
    assert len(unseen) > 150 and len(seen) > 150, (len(unseen), len(seen))
    assert not seen & unseen, sorted(seen & unseen)[:20]
    assert {split_of(v) for v in seen} == {"train"} and {split_of(v) for v in unseen} == {"heldout"}
    heldout_cities = {c for c in WEATHER if split_of(c) == "heldout"}
    assert unseen & heldout_cities and len(heldout_cities) >= 5


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="split must be one of"):
        generate_examples(3, seed=0, split="test")
    with pytest.raises(ValueError, match="n must be >= 0"):
        generate_examples(-1, seed=0)


def test_invented_names_and_places_are_fixed_many_and_never_real_cities():
    from glm47.training.corpus_turns import _pool, made_up_words

    names, places = made_up_words("name", 400), made_up_words("place", 300)
    assert names == made_up_words("name", 400) and len(set(names)) == 400 and len(set(places)) == 300
    assert not set(places) & set(WEATHER) and all(w[0].isupper() for w in names + places)
    # Both splits get hundreds of them, partitioned like every other value.
    for kind, real in (("name", NAMES), ("unknown_city", UNKNOWN_CITIES)):
        train, held = set(_pool(kind, "train")), set(_pool(kind, "heldout"))
        assert not train & held and len(train) > 200 and len(held) > 50 and set(real) <= train | held
