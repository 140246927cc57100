"""`glm47 chat` in-process with a scripted model: lines from stdin until /exit or EOF, the conversation kept
across turns, reasoning / tool calls / results / answers printed, flags passed through, and one-shot mode."""

import io
import json

import pytest

import glm47.cli.chat as chat_cli
from glm47.cli.main import main
from glm47.llm import ChatOutput
from glm47.parsers import ToolCall


class ScriptedLLM:
    def __init__(self, replies):
        self.replies, self.calls, self.loaded = list(replies), [], None

    def chat(self, messages, tools=None, sampling_params=None, enable_thinking=True, clear_thinking=True):
        self.calls.append(dict(messages=[dict(m) for m in messages], tools=tools, params=sampling_params,
                               enable_thinking=enable_thinking))
        return self.replies.pop(0)


def calc_call(expression: str) -> ChatOutput:
    call = ToolCall("call_1", "calculator", json.dumps({"expression": expression}))
    return ChatOutput("The user wants arithmetic. I will use the calculator.", None, [call], "tool_calls", "")


def answer(content: str, reasoning: str | None = "I can answer.") -> ChatOutput:
    return ChatOutput(reasoning, content, [], "stop", "")


@pytest.fixture
def fake(monkeypatch):
    """Installs a scripted model and stdin; returns a function that runs `glm47 chat` and its output."""
    def run(replies, stdin="", args=()):
        llm = ScriptedLLM(replies)

        def load_llm(model, dtype):
            llm.loaded = (model, dtype)
            return llm

        monkeypatch.setattr(chat_cli, "load_llm", load_llm)
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        out = io.StringIO()
        monkeypatch.setattr("sys.stdout", out)
        code = main(["chat", "--model", "ckpt", *args])
        return code, out.getvalue(), llm
    return run


def test_interactive_chat_shows_each_step_and_keeps_the_conversation(fake):
    replies = [calc_call("12 * 7"), answer("12 * 7 = 84."), answer("You asked for 12 * 7.", None)]
    code, out, llm = fake(replies, "What is 12 * 7?\n\nWhat did I ask?\n/exit\nnever read\n")
    assert code == 0 and llm.loaded == ("ckpt", "bfloat16")
    assert out == (
        "[thinking]\nThe user wants arithmetic. I will use the calculator.\n"
        '[tool call] calculator(expression="12 * 7")\n'
        "[tool result] 84\n"
        "[thinking]\nI can answer.\n"
        "[answer]\n12 * 7 = 84.\n"
        "[answer]\nYou asked for 12 * 7.\n"
    )
    assert len(llm.calls) == 3  # the blank line is skipped and nothing after /exit is read
    second_turn = llm.calls[2]["messages"]
    assert [m["role"] for m in second_turn] == ["user", "assistant", "tool", "assistant", "user"]
    assert second_turn[2]["content"] == "84" and second_turn[-1]["content"] == "What did I ask?"


def test_end_of_input_ends_the_chat(fake):
    code, out, llm = fake([answer("Hello!")], "Hi\n")
    assert code == 0 and out.endswith("[answer]\nHello!\n") and len(llm.calls) == 1


def test_an_empty_reply_is_shown_as_empty(fake):
    _, out, _ = fake([answer("", "Still thinking about")], "", ["Hi"])
    assert out == "[thinking]\nStill thinking about\n[answer]\n(empty)\n"


def test_one_shot_question_answers_once_without_reading_stdin(fake):
    code, out, llm = fake([answer("4")], "this line is not a question\n", ["What is 2 + 2?"])
    assert code == 0 and out == "[thinking]\nI can answer.\n[answer]\n4\n"
    assert [m["content"] for m in llm.calls[0]["messages"]] == ["What is 2 + 2?"]


def test_flags_reach_the_agent_and_the_sampler(fake):
    args = ["--no-tools", "--no-thinking", "--system", "Be brief.", "--temperature", "0", "--seed", "3",
            "--max-tokens", "64", "Hi"]
    _, _, llm = fake([answer("Hello!", None)], "", args)
    call = llm.calls[0]
    assert call["tools"] == [] and call["enable_thinking"] is False
    assert call["messages"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    p = call["params"]
    assert (p.temperature, p.seed, p.max_tokens) == (0.0, 3, 64)


def test_default_offers_every_builtin_tool(fake):
    from glm47.tools import TOOLS

    _, _, llm = fake([answer("ok")], "", ["Hi"])
    assert llm.calls[0]["tools"] == TOOLS and llm.calls[0]["enable_thinking"] is True


def test_reset_starts_a_new_conversation_but_keeps_the_system_message(fake):
    _, out, llm = fake([answer("A"), answer("B")], "first\n/reset\nsecond\n", ["--system", "S"])
    assert "[new conversation]" in out
    assert [m["content"] for m in llm.calls[1]["messages"]] == ["S", "second"]


def test_a_model_that_never_answers_is_stopped_after_max_rounds(fake):
    _, out, llm = fake([calc_call("1 + 1")] * 2, "", ["--max-rounds", "2", "loop"])
    assert len(llm.calls) == 2
    assert out.endswith("[stopped: no answer after 2 model replies]\n")


def test_bad_max_rounds_is_a_clear_error_before_loading_the_model(fake, capsys):
    code, out, llm = fake([], "", ["--max-rounds", "0", "Hi"])
    assert code == 2 and out == "" and llm.loaded is None
    assert capsys.readouterr().err == "glm47 chat: error: --max-rounds must be >= 1, got 0\n"
