"""The agent loop against a scripted model: tool calls are run and their results fed back as tool messages,
reasoning is kept on each assistant turn, and the loop stops on an answer or after max_rounds replies."""

import json

import pytest

from glm47.agent import run_agent
from glm47.llm import ChatOutput
from glm47.parsers import ToolCall
from glm47.tools import TOOLS, tool_definitions


class ScriptedLLM:
    """Replies from a list, in order, and records what each chat() call was given."""

    def __init__(self, replies: list[ChatOutput]):
        self.replies, self.calls = list(replies), []

    def chat(self, messages, tools=None, sampling_params=None, enable_thinking=True, clear_thinking=True):
        self.calls.append(dict(messages=[dict(m) for m in messages], tools=tools, sampling_params=sampling_params,
                               enable_thinking=enable_thinking, clear_thinking=clear_thinking))
        return self.replies.pop(0)


def tool_reply(reasoning: str, *calls: tuple[str, dict]) -> ChatOutput:
    tool_calls = [ToolCall(f"call_{i}", name, json.dumps(args)) for i, (name, args) in enumerate(calls)]
    return ChatOutput(reasoning, None, tool_calls, "tool_calls", "")


def answer(reasoning: str | None, content: str) -> ChatOutput:
    return ChatOutput(reasoning, content, [], "stop", "")


USER = [{"role": "user", "content": "What is 12 * 7?"}]


def test_a_tool_call_is_run_and_its_result_fed_back_before_the_answer():
    llm = ScriptedLLM([tool_reply("I will use the calculator.", ("calculator", {"expression": "12 * 7"})),
                       answer("The calculator returned 84.", "12 * 7 = 84.")])
    new = run_agent(llm, USER)
    assert new == [
        {"role": "assistant", "content": "", "reasoning_content": "I will use the calculator.",
         "tool_calls": [{"id": "call_0", "type": "function",
                         "function": {"name": "calculator", "arguments": {"expression": "12 * 7"}}}]},
        {"role": "tool", "tool_call_id": "call_0", "name": "calculator", "content": "84"},
        {"role": "assistant", "content": "12 * 7 = 84.", "reasoning_content": "The calculator returned 84."},
    ]
    # The second model call sees the first turn (with its reasoning) and the tool result.
    assert len(llm.calls) == 2
    assert llm.calls[0]["messages"] == USER and llm.calls[1]["messages"] == USER + new[:2]
    assert llm.calls[0]["tools"] == TOOLS  # default: every built-in tool
    assert USER == [{"role": "user", "content": "What is 12 * 7?"}]  # the caller's list is not modified


def test_parallel_calls_each_get_a_tool_message_in_order():
    llm = ScriptedLLM([tool_reply("Both cities.", ("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})),
                       answer("Paris is warmer.", "Paris is warmer: 15°C versus -1°C.")])
    new = run_agent(llm, [{"role": "user", "content": "Paris or Oslo, which is warmer?"}])
    assert [(m["role"], m["content"]) for m in new[1:3]] == [("tool", "Paris: 15°C, cloudy"), ("tool", "Oslo: -1°C, snowy")]
    assert [m["tool_call_id"] for m in new[1:3]] == ["call_0", "call_1"]


def test_an_answer_without_tool_calls_stops_after_one_round():
    llm = ScriptedLLM([answer(None, "Hello!")])
    assert run_agent(llm, [{"role": "user", "content": "Hi"}], enable_thinking=False) == [
        {"role": "assistant", "content": "Hello!"}]
    assert llm.calls[0]["enable_thinking"] is False and llm.calls[0]["clear_thinking"] is True


def test_the_loop_stops_at_max_rounds_when_the_model_keeps_calling_tools():
    call = ("calculator", {"expression": "1 + 1"})
    llm = ScriptedLLM([tool_reply("again", call) for _ in range(5)])
    events = []
    new = run_agent(llm, USER, max_rounds=3, on_event=lambda kind, payload: events.append(kind))
    assert len(llm.calls) == 3 and len(llm.replies) == 2
    assert [m["role"] for m in new] == ["assistant", "tool"] * 3
    assert events[-1] == "max_rounds"


def test_unknown_or_unoffered_tools_get_an_error_result():
    llm = ScriptedLLM([tool_reply("", ("search_web", {"q": "news"}), ("calculator", {"expression": "2 + 2"})),
                       answer("", "Sorry.")])
    new = run_agent(llm, USER, tools=tool_definitions(["get_weather"]))
    assert new[1]["content"] == "error: unknown tool 'search_web'; available: get_weather"
    assert new[2]["content"] == "error: unknown tool 'calculator'; available: get_weather"


def test_bad_arguments_reach_the_model_as_an_error_result():
    llm = ScriptedLLM([tool_reply("", ("date_add", {"date": "2024-02-30", "days": 1})), answer("", "Invalid date.")])
    new = run_agent(llm, USER)
    assert new[1]["content"] == "error: '2024-02-30' is not a date like 2024-05-17"


def test_no_tools_offers_an_empty_list_and_settings_pass_through():
    llm = ScriptedLLM([answer("", "42")])
    params = object()
    run_agent(llm, USER, tools=[], sampling_params=params, clear_thinking=False)
    assert llm.calls[0]["tools"] == [] and llm.calls[0]["sampling_params"] is params
    assert llm.calls[0]["clear_thinking"] is False


def test_events_report_reasoning_calls_results_and_the_answer_in_order():
    llm = ScriptedLLM([ChatOutput("Use the tool.", "Let me check.", [ToolCall("c1", "get_weather", '{"city": "Rome"}')],
                                  "tool_calls", ""),
                       answer("Rome is 20°C.", "It is 20°C in Rome.")])
    events = []
    run_agent(llm, [{"role": "user", "content": "Weather in Rome?"}], on_event=lambda k, p: events.append((k, p)))
    assert events == [
        ("reasoning", "Use the tool."),
        ("content", "Let me check."),
        ("tool_call", {"id": "c1", "name": "get_weather", "arguments": {"city": "Rome"}}),
        ("tool_result", {"id": "c1", "name": "get_weather", "content": "Rome: 20°C, sunny"}),
        ("reasoning", "Rome is 20°C."),
        ("answer", "It is 20°C in Rome."),
    ]


def test_max_rounds_below_one_is_refused():
    with pytest.raises(ValueError, match="max_rounds must be >= 1, got 0"):
        run_agent(ScriptedLLM([]), USER, max_rounds=0)
