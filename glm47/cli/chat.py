"""`glm47 chat`: a terminal chat through the agent loop (glm47/agent.py) with the built-in tools. Shows the
reasoning (dimmed), each tool call and its result, then the answer, and keeps the conversation across turns.
Reads one message per line from stdin until EOF or /exit; with a QUESTION argument it answers once and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from glm47.agent import run_agent

COMMANDS_HELP = "commands: /exit (or EOF) leaves, /reset starts a new conversation"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="chat in the terminal; the model may call the built-in tools",
                       description="Chat with a model that may call the built-in tools (calculator, unit "
                                   "conversion, weather table, date arithmetic). " + COMMANDS_HELP + ".")
    p.add_argument("question", nargs="?", help="answer this one question and exit (default: read stdin)")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--system", help="a system message to put first")
    p.add_argument("--no-thinking", action="store_true", help="switch thinking off")
    p.add_argument("--no-tools", action="store_true", help="offer no tools")
    p.add_argument("--max-tokens", type=int, default=512, help="per model reply (default 512)")
    p.add_argument("--max-rounds", type=int, default=8, help="model replies per user message (default 8)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.set_defaults(func=run)


def load_llm(model: str, dtype: str) -> Any:
    """The model; a function of its own so tests can swap in a scripted one (and torch loads only here)."""
    from glm47.llm import LLM

    return LLM(model, dtype=dtype)


class EventPrinter:
    """Turns the agent's events into terminal lines: a header per part, reasoning dimmed on a terminal."""

    HEADERS = {"reasoning": "[thinking]", "answer": "[answer]", "content": "[answer]"}

    def __init__(self, out: TextIO):
        self.out, self.color = out, out.isatty()

    def __call__(self, kind: str, payload: Any) -> None:
        if kind in self.HEADERS:
            text = payload.strip() or "(empty)"  # e.g. the reply ran out of tokens while still reasoning
            self._line(self._style(self.HEADERS[kind], "1"))
            self._line(self._style(text, "2") if kind == "reasoning" else text)
        elif kind == "tool_call":
            args = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in payload["arguments"].items())
            self._line(self._style("[tool call]", "1") + f" {payload['name']}({args})")
        elif kind == "tool_result":
            self._line(self._style("[tool result]", "1") + f" {payload['content']}")
        elif kind == "max_rounds":
            self._line(self._style(f"[stopped: no answer after {payload} model replies]", "1"))

    def _line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def _style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text


def run(args: argparse.Namespace) -> int:
    from glm47.engine.sampling import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=0.95, max_tokens=args.max_tokens, seed=args.seed)
    if args.max_rounds < 1:
        raise ValueError(f"--max-rounds must be >= 1, got {args.max_rounds}")
    llm = load_llm(args.model, args.dtype)
    start = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(start)
    printer = EventPrinter(sys.stdout)

    def answer(text: str) -> None:
        messages.append({"role": "user", "content": text})
        messages.extend(run_agent(llm, messages, [] if args.no_tools else None, params,
                                  enable_thinking=not args.no_thinking, max_rounds=args.max_rounds,
                                  on_event=printer))

    if args.question:
        answer(args.question)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(COMMANDS_HELP)
    try:
        while True:
            if interactive:
                sys.stdout.write("> ")
                sys.stdout.flush()
            line = sys.stdin.readline()
            text = line.strip()
            if not line or text == "/exit":
                return 0
            if text == "/reset":
                messages[:] = start
                print("[new conversation]")
            elif text:
                answer(text)
    except KeyboardInterrupt:  # Ctrl-C leaves quietly, as /exit does
        print()
        return 0
