"""`glm47 chat` in-process with a scripted model: lines from stdin until /exit or EOF, the conversation kept
across turns with its reasoning, reasoning / tool calls / results / answers printed (streamed when the model
streams), /think /clear /help, flags passed through, one-shot mode, the embedded default model, and --url
against a real server whose scripted engine calls the built-in calculator."""

import io
import json
import sys
import types

import pytest
from calculator_util import KEY
from server_util import free_port

import glm47.cli.chat as chat_cli
from glm47.cli.main import main
from glm47.llm import ChatChunk, ChatOutput
from glm47.parsers import Delta, ToolCall, ToolCallDelta


class ScriptedLLM:
    def __init__(self, replies):
        self.replies, self.calls, self.loaded = list(replies), [], None

    def chat(self, messages, tools=None, sampling_params=None, enable_thinking=True, clear_thinking=True):
        self.calls.append(dict(messages=[dict(m) for m in messages], tools=tools, params=sampling_params,
                               enable_thinking=enable_thinking, clear_thinking=clear_thinking))
        reply = self.replies.pop(0)
        if isinstance(reply, Exception):
            raise reply
        return reply


class StreamingLLM(ScriptedLLM):
    """Replies are (deltas, finish_reason), streamed as LLM.chat_stream does (the finish reason comes last).
    Records what the terminal showed each time it was about to produce the next delta."""

    def __init__(self, replies):
        super().__init__(replies)
        self.seen = []

    def chat_stream(self, messages, tools=None, sampling_params=None, enable_thinking=True, clear_thinking=True):
        deltas, reason = self.chat(messages, tools, sampling_params, enable_thinking, clear_thinking)
        for d in deltas:
            self.seen.append(sys.stdout.getvalue())
            if isinstance(d, Exception):
                raise d
            yield ChatChunk(d)
        yield ChatChunk(None, reason)


class TTY(io.StringIO):
    def isatty(self):
        return True


def calc_call(expression: str) -> ChatOutput:
    call = ToolCall("call_1", "calculator", json.dumps({"expression": expression}))
    return ChatOutput("The user wants arithmetic. I will use the calculator.", None, [call], "tool_calls", "")


def answer(content: str, reasoning: str | None = "I can answer.") -> ChatOutput:
    return ChatOutput(reasoning, content, [], "stop", "")


@pytest.fixture
def fake(monkeypatch):
    """Installs a scripted model and stdin; returns a function that runs `glm47 chat` and its output."""
    def run(replies, stdin="", args=(), source=("--model", "ckpt"), llm_class=ScriptedLLM, out=None):
        llm = llm_class(replies)

        def load_llm(model, dtype, speculative_tokens=0):
            llm.loaded = (model, dtype) if not speculative_tokens else (model, dtype, speculative_tokens)
            return llm

        monkeypatch.setattr(chat_cli, "load_llm", load_llm)
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        out = out or io.StringIO()
        monkeypatch.setattr("sys.stdout", out)
        code = main(["chat", *source, *args])
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


def test_replies_and_commands_never_clear_earlier_reasoning(fake):
    replies = [calc_call("12 * 7"), answer("84."), answer("Again 84.")]
    _, _, llm = fake(replies, "What is 12 * 7?\nAnd again?\n")
    assert all(c["clear_thinking"] is False for c in llm.calls)  # preserved thinking
    history = llm.calls[2]["messages"]
    assert history[1]["reasoning_content"] == "The user wants arithmetic. I will use the calculator."
    assert history[3] == {"role": "assistant", "content": "84.", "reasoning_content": "I can answer."}


def reasoning(text):
    return Delta(reasoning_content=text)


def content(text):
    return Delta(content=text)


def call_head(name, call_id="call_1", index=0):
    return Delta(tool_calls=[ToolCallDelta(index, call_id, name, "")])


def call_args(fragment, index=0):
    return Delta(tool_calls=[ToolCallDelta(index, None, None, fragment)])


STREAMED = [
    ([reasoning("The user wants "), reasoning("arithmetic.\n"), call_head("calculator"),
      call_args('{"expression": '), call_args('"12 * 7"}')], "tool_calls"),
    ([reasoning("84, so"), reasoning(" I answer."), content("12 * 7"), content(" = 84.")], "stop"),
]


def test_a_streaming_model_is_shown_piece_by_piece_as_it_arrives(fake):
    code, out, llm = fake(list(STREAMED), "What is 12 * 7?\n", llm_class=StreamingLLM)
    assert code == 0 and out == (
        "[thinking]\nThe user wants arithmetic.\n"
        '[tool call] calculator(expression="12 * 7")\n'
        "[tool result] 84\n"
        "[thinking]\n84, so I answer.\n"
        "[answer]\n12 * 7 = 84.\n"
    )
    # Each piece is on the terminal before the model makes the next one (trailing blanks wait for more text).
    assert llm.seen[1] == "[thinking]\nThe user wants"
    assert llm.seen[-1].endswith("[thinking]\n84, so I answer.\n[answer]\n12 * 7")
    # The streamed call is assembled, run, and its result sent back; the reasoning is kept on the turn.
    turn, result = llm.calls[1]["messages"][1:3]
    assert turn["reasoning_content"] == "The user wants arithmetic.\n"
    assert turn["tool_calls"][0]["function"] == {"name": "calculator", "arguments": {"expression": "12 * 7"}}
    assert result == {"role": "tool", "tool_call_id": "call_1", "name": "calculator", "content": "84"}


def test_on_a_terminal_reasoning_is_dimmed_and_headers_are_bold(fake):
    _, out, _ = fake(list(STREAMED), "", ["What is 12 * 7?"], llm_class=StreamingLLM, out=TTY())
    assert out.startswith("\033[1m[thinking]\033[0m\n\033[2mThe user wants\033[0m\033[2m arithmetic.\033[0m\n"
                          '\033[1m[tool call]\033[0m calculator(expression="12 * 7")\n')
    assert out.endswith("\033[1m[answer]\033[0m\n12 * 7 = 84.\n")


def test_a_call_cut_off_by_max_tokens_is_not_run(fake):
    cut = ([reasoning("Let me compute."), call_head("calculator"), call_args('{"expression": "1')], "length")
    _, out, llm = fake([cut], "", ["--max-tokens", "9", "Hi"], llm_class=StreamingLLM)
    assert len(llm.calls) == 1
    assert out == "[thinking]\nLet me compute.\n[answer]\n(empty)\n"


def test_think_off_and_on_switch_thinking_for_the_next_turns(fake):
    _, out, llm = fake([answer("A", None), answer("B")], "/think off\nfirst\n/think on\nsecond\n/think\n")
    assert [c["enable_thinking"] for c in llm.calls] == [False, True]
    assert out.startswith("[thinking off]\n[answer]\nA\n[thinking on]\n")
    assert out.endswith("[thinking on]\n")  # /think alone shows the state


def test_no_thinking_flag_starts_with_thinking_off_until_think_on(fake):
    _, _, llm = fake([answer("A", None), answer("B")], "first\n/think on\nsecond\n", ["--no-thinking"])
    assert [c["enable_thinking"] for c in llm.calls] == [False, True]


def test_clear_starts_a_new_conversation_but_keeps_the_system_message(fake):
    _, out, llm = fake([answer("A"), answer("B")], "first\n/clear\nsecond\n", ["--system", "S"])
    assert out.count("[new conversation]") == 1
    assert [m["content"] for m in llm.calls[1]["messages"]] == ["S", "second"]


@pytest.mark.parametrize("line", ["/help", "/what", "/think maybe", "/clear everything"])
def test_help_and_unknown_commands_print_the_commands_and_reach_no_model(fake, line):
    _, out, llm = fake([], line + "\n")
    assert llm.calls == [] and out.endswith(chat_cli.COMMANDS_HELP + "\n")
    assert out.startswith("unknown command") == (line != "/help")


def test_without_model_or_url_the_embedded_default_model_is_used(fake, monkeypatch, tmp_path):
    assets = types.ModuleType("glm47.assets")
    assets.default_model_path = lambda: tmp_path
    monkeypatch.setitem(sys.modules, "glm47.assets", assets)
    code, _, llm = fake([answer("ok")], "", ["Hi"], source=())
    assert code == 0 and llm.loaded == (str(tmp_path), "bfloat16")


def test_without_model_or_url_and_no_embedded_model_the_error_says_so(fake, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "glm47.assets", None)  # importing it fails, as before it is installed
    code, out, llm = fake([], "", ["Hi"], source=())
    assert code == 2 and out == "" and llm.loaded is None
    assert capsys.readouterr().err == ("glm47 chat: error: no --model or --url given and no embedded default "
                                       "model is installed\n")


def test_model_and_url_together_are_refused(fake, capsys):
    code, _, llm = fake([], "", ["Hi"], source=("--model", "ckpt", "--url", "http://127.0.0.1:1"))
    assert code == 2 and llm.loaded is None
    assert capsys.readouterr().err == "glm47 chat: error: give --model or --url, not both\n"


def test_a_failed_reply_is_reported_and_the_chat_goes_on_without_it(fake, capsys):
    code, out, llm = fake([ValueError("prompt of 9000 tokens exceeds 4096"), answer("ok")], "first\nsecond\n")
    assert code == 0 and out == "[thinking]\nI can answer.\n[answer]\nok\n"
    assert capsys.readouterr().err == "glm47 chat: error: prompt of 9000 tokens exceeds 4096\n"
    assert llm.calls[1]["messages"] == [{"role": "user", "content": "second"}]  # the failed turn is not kept


def test_a_server_error_mid_stream_ends_the_line_and_a_one_shot_question_exits_1(fake, capsys):
    from glm47.server.client import ServerError

    code, out, _ = fake([([reasoning("Hmm"), ServerError(None, "engine died")], None)], "", ["Hi"],
                        llm_class=StreamingLLM)
    assert code == 1 and out == "[thinking]\nHmm\n"
    assert capsys.readouterr().err == "glm47 chat: error: engine died\n"


# ---- --url: a real server on a loopback port, its scripted engine calling the built-in calculator ----------

EXCHANGE = ("[thinking]\nThe user wants arithmetic.\n"
            '[tool call] calculator(expression="12 * 7")\n'
            "[tool result] 84\n"
            "[thinking]\nThe calculator says 84.\n"
            "[answer]\n12 * 7 = 84.\n")


def test_url_chats_with_a_running_server_tools_run_here_and_thinking_is_preserved(server, monkeypatch):
    url, engine = server
    monkeypatch.setenv("GLM47_API_KEY", KEY)
    monkeypatch.setattr(chat_cli, "load_llm", None)  # no model is loaded
    monkeypatch.setattr("sys.stdin", io.StringIO("What is 12 * 7?\nAnd again?\n/exit\n"))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    before = len(engine.prompts)
    assert main(["chat", "--url", url, "--seed", "1"]) == 0
    assert out.getvalue() == EXCHANGE * 2
    prompts = [engine.tokenizer.decode(p) for p in engine.prompts[before:]]
    assert len(prompts) == 4  # two model replies per question: the call, then the answer
    assert "<tool_response>84</tool_response>" in prompts[1]  # the tool ran here; its result went back
    # The second question's prompt still holds the first answer's reasoning (clear_thinking false).
    assert "<think>The calculator says 84.</think>12 * 7 = 84." in prompts[2]


def test_url_think_off_reaches_the_server(server, monkeypatch):
    url, _ = server
    monkeypatch.setattr("sys.stdin", io.StringIO("/think off\nHi\n"))
    out = io.StringIO()
    monkeypatch.setattr("sys.stdout", out)
    assert main(["chat", "--url", url, "--api-key", KEY]) == 0
    assert out.getvalue() == "[thinking off]\n[answer]\nThinking is off.\n"


@pytest.mark.parametrize("make_url, key, reason", [
    (lambda url: url, "wrong-key", "401"),
    (lambda url: f"http://127.0.0.1:{free_port()}", KEY, "cannot reach"),
])
def test_url_that_refuses_or_is_unreachable_is_a_clear_error(server, capsys, make_url, key, reason):
    url = make_url(server[0])
    assert main(["chat", "--url", url, "--api-key", key, "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"glm47 chat: error: --url {url}: ") and reason in err and "Traceback" not in err


def test_speculative_tokens_flag_reaches_the_model(fake):
    code, _, llm = fake([answer("Hello.")], "Hi\n/exit\n", args=("--speculative-tokens", "2"))
    assert code == 0 and llm.loaded == ("ckpt", "bfloat16", 2)
