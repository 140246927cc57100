"""`glm47 chat --url` run as a real program in a pseudo-terminal, for one exchange with a real server (the
scripted engine calls the built-in calculator, then answers): the prompt, the streamed reply with dimmed
reasoning and bold headers, the tool call and its result, then /exit and exit code 0."""

import os
import pty
import select
import subprocess
import sys
import time

import pytest
from calculator_util import KEY, calculator_server

from glm47.cli.chat import COMMANDS_HELP

pytestmark = pytest.mark.skipif(not sys.platform.startswith(("linux", "darwin")), reason="needs a POSIX pty")


def bold(text):
    return f"\033[1m{text}\033[0m"


def dim(text):
    return f"\033[2m{text}\033[0m"


class Terminal:
    """The master side of a pty: type into it, and read what the program wrote (and the terminal echoed)
    since the last read."""

    def __init__(self, fd: int):
        self.fd, self.text, self.mark, self.open = fd, "", 0, True

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\r").encode())  # Enter sends a carriage return; the tty makes it "\n"

    def read_until(self, ending: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while not self._new().endswith(ending):
            assert self.open, f"the program closed the terminal: {self.text[-400:]!r}"
            assert time.monotonic() < deadline, f"waited for {ending!r}; the terminal shows {self.text[-400:]!r}"
            self._read(0.1)
        return self._take()

    def read_to_end(self, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            self._read(0.1)
        return self._take()

    def _new(self) -> str:
        # The tty turns "\n" into "\r\n"; each streamed reasoning piece is dimmed on its own, so join them.
        return self.text[self.mark:].replace("\r\n", "\n").replace("\033[0m\033[2m", "")

    def _take(self) -> str:
        new, self.mark = self._new(), len(self.text)
        return new

    def _read(self, wait: float) -> None:
        if not select.select([self.fd], [], [], wait)[0]:
            return
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: every slave descriptor is closed, the program has gone
            data = b""
        self.open = bool(data)
        self.text += data.decode("utf-8", "replace")


def test_one_exchange_in_a_pseudo_terminal_streams_dimmed_reasoning_and_the_tool_call_then_exits_cleanly():
    with calculator_server() as (url, _):
        master, slave = pty.openpty()
        env = dict(os.environ, OMP_NUM_THREADS="1", GLM47_API_KEY="")
        proc = subprocess.Popen([sys.executable, "-m", "glm47.cli.main", "chat", "--url", url, "--api-key", KEY],
                                stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True)
        os.close(slave)
        term = Terminal(master)
        try:
            assert term.read_until("> ") == bold(COMMANDS_HELP) + "\n> "
            term.type("What is 12 * 7?")
            exchange = term.read_until("\n> ")
            term.type("/exit")
            assert proc.wait(timeout=30) == 0
            end = term.read_to_end()
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
    assert exchange == ("What is 12 * 7?\n"  # the terminal's echo of what was typed
                        + bold("[thinking]") + "\n" + dim("The user wants arithmetic.") + "\n"
                        + bold("[tool call]") + ' calculator(expression="12 * 7")\n'
                        + bold("[tool result]") + " 84\n"
                        + bold("[thinking]") + "\n" + dim("The calculator says 84.") + "\n"
                        + bold("[answer]") + "\n12 * 7 = 84.\n> ")
    assert end == "/exit\n"
