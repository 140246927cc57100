"""`glm47 chat`: a terminal chat through the agent loop (glm47/agent.py) with the built-in tools, against the
embedded default model, a checkpoint (--model) or a running `glm47 serve` (--url). Streams the reasoning
(dimmed, under its own header), then the answer; shows each tool call and its result. The conversation is
kept across turns with each reply's reasoning (preserved thinking). Reads one message per line from stdin
until EOF or /exit; with a QUESTION argument it answers once and exits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, TextIO

from glm47.agent import run_agent
from glm47.cli.common import SPECULATIVE_HELP, model_dir
from glm47.sampling_params import RECOMMENDED_TOP_P, SamplingParams

COMMANDS_HELP = ("commands: /think on|off switches thinking, /clear (or /reset) starts a new conversation, "
                 "/help shows this, /exit (or EOF) leaves")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat in the terminal; the model may call the built-in tools",
                       description="Chat with a model that may call the built-in tools (calculator, unit "
                                   "conversion, weather table, date arithmetic): the embedded default model, "
                                   "a checkpoint (--model) or a running `glm47 serve` (--url). "
                                   + COMMANDS_HELP + ".")
    p.add_argument("question", nargs="?", help="answer this one question and exit (default: read stdin)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--url", help="chat with a running `glm47 serve` at this address instead of loading a model")
    p.add_argument("--api-key", help="the server's API key, with --url (default: $GLM47_API_KEY)")
    p.add_argument("--system", help="a system message to put first")
    p.add_argument("--no-thinking", action="store_true", help="start with thinking off (/think on switches it on)")
    p.add_argument("--no-tools", action="store_true", help="offer no tools")
    p.add_argument("--max-tokens", type=int, default=512, help="per model reply (default 512)")
    p.add_argument("--max-rounds", type=int, default=8, help="model replies per user message (default 8)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="N", help=SPECULATIVE_HELP)
    p.set_defaults(func=run)


def load_llm(model: str, dtype: str, speculative_tokens: int = 0) -> Any:
    """The model; a function of its own so tests can swap in a scripted one (and torch loads only here)."""
    from glm47.llm import LLM

    return LLM(model, dtype=dtype, num_speculative_tokens=speculative_tokens)


class RemoteModel:
    """A running `glm47 serve` behind LLM.chat_stream's signature, so the agent loop drives it like a local
    model. Sampling settings are request fields fixed here; sampling_params (a local SamplingParams) is unused."""

    def __init__(self, client: Any, options: dict):
        self.client, self.options = client, options

    def chat_stream(self, messages: list[dict], tools: list[dict] | None = None, sampling_params: Any = None,
                    enable_thinking: bool = True, clear_thinking: bool = True):
        return self.client.chat_stream([_on_the_wire(m) for m in messages], tools or None,
                                       enable_thinking=enable_thinking, clear_thinking=clear_thinking,
                                       **self.options)


def _on_the_wire(message: dict) -> dict:
    # The agent keeps tool-call arguments as objects; OpenAI's wire format has them as JSON text.
    if not message.get("tool_calls"):
        return message
    calls = [{**c, "function": {**c["function"], "arguments": json.dumps(c["function"]["arguments"],
                                                                         ensure_ascii=False)}}
             for c in message["tool_calls"]]
    return {**message, "tool_calls": calls}


class EventPrinter:
    """Turns the agent's events into terminal output as they arrive: a header when the reply moves between
    reasoning and answer, reasoning dimmed on a terminal, one line per tool call and per tool result."""

    HEADERS = {"reasoning": "[thinking]", "content": "[answer]"}

    def __init__(self, out: TextIO):
        self.out, self.color = out, out.isatty()
        self.section: str | None = None  # "reasoning" | "content" while one is being written
        self.held = ""  # trailing whitespace, written only if more text follows in the same section
        self.blank = True  # no text under the current header yet (leading whitespace is dropped)

    def __call__(self, kind: str, payload: Any) -> None:
        if kind in self.HEADERS:
            self._piece(kind, payload)
        elif kind == "answer":
            if self.section != "content":  # nothing streamed as content: say so, e.g. the reply ran out of tokens
                self._piece("content", payload.strip() or "(empty)")
            self.end()
        elif kind == "tool_call":
            args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in payload["arguments"].items())
            self._line(self._style("[tool call]", "1") + f" {payload['name']}({args})")
        elif kind == "tool_result":
            self._line(self._style("[tool result]", "1") + f" {payload['content']}")
        elif kind == "max_rounds":
            self._line(self._style(f"[stopped: no answer after {payload} model replies]", "1"))

    def note(self, text: str) -> None:
        """A line of our own (command results), ending whatever was being written."""
        self._line(self._style(text, "1"))

    def end(self) -> None:
        if self.section is not None:
            self.out.write("\n")
            self.out.flush()
        self.section, self.held = None, ""

    def _piece(self, section: str, text: str) -> None:
        if section != self.section:
            self.end()
            self.out.write(self._style(self.HEADERS[section], "1") + "\n")
            self.section, self.blank = section, True
        text = self.held + text
        if self.blank:  # nothing written under this header yet
            text = text.lstrip()
        body = text.rstrip()
        self.held = text[len(body):]
        if body:
            self.out.write(self._style(body, "2") if section == "reasoning" else body)
            self.blank = False
        self.out.flush()

    def _line(self, text: str) -> None:
        self.end()
        self.out.write(text + "\n")
        self.out.flush()

    def _style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text


def open_model(args: argparse.Namespace) -> tuple[Any, Any]:
    """(model, sampling_params) from the flags: a server client, a checkpoint, or the embedded default."""
    if args.url and args.model:
        raise ValueError("give --model or --url, not both")
    if args.url:
        from glm47.server.client import ServerClient, ServerError

        client = ServerClient(args.url, args.api_key or os.environ.get("GLM47_API_KEY"))
        try:
            client.models()  # fail now, with the reason, rather than on the first message
        except ServerError as e:
            raise ValueError(f"--url {args.url}: {e}") from None
        options = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=RECOMMENDED_TOP_P,
                       seed=args.seed)
        return RemoteModel(client, options), None
    params = SamplingParams(temperature=args.temperature, top_p=RECOMMENDED_TOP_P, max_tokens=args.max_tokens,
                            seed=args.seed)
    return load_llm(model_dir(args.model, "--model or --url"), args.dtype, args.speculative_tokens), params


class Session:
    """One conversation: the messages so far (reasoning kept), the thinking switch, and the commands."""

    def __init__(self, llm: Any, params: Any, args: argparse.Namespace, printer: EventPrinter):
        self.llm, self.params, self.printer = llm, params, printer
        self.tools = [] if args.no_tools else None  # None: every built-in tool
        self.max_rounds, self.thinking = args.max_rounds, not args.no_thinking
        self.start = [{"role": "system", "content": args.system}] if args.system else []
        self.messages = list(self.start)

    def send(self, text: str) -> bool:
        """One user message through the agent loop; False (and the conversation unchanged) if it failed."""
        from glm47.server.client import ServerError

        user = {"role": "user", "content": text}
        try:
            # clear_thinking=False: earlier replies' reasoning stays in the prompt (preserved thinking).
            new = run_agent(self.llm, self.messages + [user], self.tools, self.params,
                            enable_thinking=self.thinking, max_rounds=self.max_rounds, on_event=self.printer,
                            clear_thinking=False)
        except (ServerError, ValueError) as e:  # e.g. a prompt too long: say so, and the user can go on
            self.printer.end()
            print(f"glm47 chat: error: {e}", file=sys.stderr)
            return False
        self.messages += [user, *new]
        return True

    def command(self, text: str) -> bool:
        """Runs a /command; False when it is /exit. Unknown ones show the help and never reach the model."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name == "/exit" and not arg:
            return False
        if name in ("/clear", "/reset") and not arg:
            self.messages = list(self.start)
            self.printer.note("[new conversation]")
        elif name == "/think" and arg in ("on", "off", ""):  # bare /think shows the state
            self.thinking = self.thinking if not arg else arg == "on"
            self.printer.note(f"[thinking {'on' if self.thinking else 'off'}]")
        else:
            self.printer.note(COMMANDS_HELP if name == "/help" else f"unknown command {text}; {COMMANDS_HELP}")
        return True


def run(args: argparse.Namespace) -> int:
    if args.max_rounds < 1:
        raise ValueError(f"--max-rounds must be >= 1, got {args.max_rounds}")
    llm, params = open_model(args)
    printer = EventPrinter(sys.stdout)
    session = Session(llm, params, args, printer)
    try:
        if args.question:
            return 0 if session.send(args.question) else 1
        interactive = sys.stdin.isatty()
        if interactive:
            printer.note(COMMANDS_HELP)
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            text = line.strip()
            if not line or (text.startswith("/") and not session.command(text)):
                return 0
            if text and not text.startswith("/"):
                session.send(text)
    except KeyboardInterrupt:  # Ctrl-C leaves quietly, as /exit does
        printer.end()
        print()
        return 0
