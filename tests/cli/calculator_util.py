"""A real server on a loopback port whose scripted engine calls the built-in calculator: what `glm47 chat --url`
talks to in the CLI tests (test_cli_chat.py, and in a pseudo-terminal test_cli_chat_pty.py)."""

import contextlib

from server_util import running

KEY = "sk-chat-test"
CALC = ("The user wants arithmetic.</think><tool_call>calculator<arg_key>expression</arg_key>"
        "<arg_value>12 * 7</arg_value></tool_call>")
AFTER_TOOL = "The calculator says 84.</think>12 * 7 = 84."

def calculator_script(prompt: str) -> str:
    """The scripted engine's reply: call the calculator, then answer once the prompt holds its result."""
    if prompt.endswith("</think>"):  # thinking switched off
        return "Thinking is off."
    return AFTER_TOOL if "<tool_response>" in prompt.rsplit("<|user|>", 1)[-1] else CALC


@contextlib.contextmanager
def calculator_server():
    """(url, engine) of a real server on a loopback port, with KEY as its API key."""
    from glm47.chat import Tokenizer
    from glm47.server.app import create_app
    from glm47.server.context import ServerConfig
    from glm47.server.scripted import ScriptedEngine

    tok = Tokenizer.default()
    engine = ScriptedEngine(tok, calculator_script)
    with running(create_app(engine, tok, ServerConfig(api_key=KEY))) as url:
        yield url, engine
