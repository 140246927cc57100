"""`glm47 generate`: a prompt or chat messages in, streamed text out (reasoning shown apart from the answer)."""

from __future__ import annotations

import argparse
import json
import sys

from glm47.cli.common import SPECULATIVE_HELP
from glm47.sampling_params import RECOMMENDED_TEMPERATURE, RECOMMENDED_TOP_P, SamplingParams


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a reply to a prompt or chat messages, streamed",
                       description="Renders PROMPT as a user message with GLM-4.7's chat template (or sends it "
                                   "as-is with --raw) and streams the reply; reasoning is shown apart.")
    p.add_argument("prompt", nargs="?", help="the user message (or raw text with --raw)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded nano GLM-4.7)")
    p.add_argument("--messages", help="JSON file with a list of chat messages ('-' reads stdin)")
    p.add_argument("--tools", help="JSON file with a list of OpenAI-style tool definitions, or 'builtin' for the "
                                   "built-in tools (calculator, units, weather, dates); calls are shown, not run")
    p.add_argument("--system", help="a system message to put first")
    p.add_argument("--raw", action="store_true", help="complete PROMPT as plain text, without the chat template")
    p.add_argument("--no-thinking", action="store_true", help="switch thinking off for this turn")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=RECOMMENDED_TEMPERATURE)
    p.add_argument("--top-p", type=float, default=RECOMMENDED_TOP_P)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--kv-cache-tokens", type=int, default=None, help="KV cache size in tokens")
    p.add_argument("--speculative-tokens", type=int, default=0, metavar="N", help=SPECULATIVE_HELP)
    p.set_defaults(func=run)


def _read_json(arg: str, what: str):
    try:
        text = sys.stdin.read() if arg == "-" else open(arg, encoding="utf-8").read()
        return json.loads(text)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--{what} {arg}: {e}") from None


def _messages(args: argparse.Namespace) -> list[dict]:
    messages = _read_json(args.messages, "messages") if args.messages else []
    if not isinstance(messages, list):
        raise ValueError("--messages must hold a JSON list of messages")
    if args.system:
        messages = [{"role": "system", "content": args.system}] + messages
    if args.prompt:
        messages.append({"role": "user", "content": args.prompt})
    if not messages:
        raise ValueError("give a prompt or --messages")
    return messages


def _tools(arg: str | None) -> list[dict] | None:
    if arg == "builtin":
        from glm47.tools import tool_definitions

        return tool_definitions()
    return _read_json(arg, "tools") if arg else None


class Printer:
    """Reasoning dimmed under a 'thinking' header, then the answer; tool calls on their own lines."""

    def __init__(self, out=None):
        self.out, self.mode = out or sys.stdout, None  # the stream of this call (a default would be the import's)
        self.color = self.out.isatty()

    def write(self, mode: str, text: str) -> None:
        if mode != self.mode:
            if self.mode is not None:
                self.out.write("\n")
            header = {"reasoning": "[thinking]", "content": "[answer]", "tool": "[tool call]"}[mode]
            self.out.write(self._style(header, "1") + "\n")
            self.mode = mode
        self.out.write(self._style(text, "2") if mode == "reasoning" else text)
        self.out.flush()

    def _style(self, text: str, code: str) -> str:
        return f"\033[{code}m{text}\033[0m" if self.color else text


def run(args: argparse.Namespace) -> int:
    from glm47.cli.common import model_dir
    from glm47.llm import LLM

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens)
    if args.raw and not args.prompt:
        raise ValueError("--raw needs a prompt")
    messages = None if args.raw else _messages(args)
    tools = _tools(args.tools)
    llm = LLM(model_dir(args.model), dtype=args.dtype, kv_cache_tokens=args.kv_cache_tokens,
              num_speculative_tokens=args.speculative_tokens)
    printer = Printer()
    reason = None
    if args.raw:
        for d in llm.generate_stream(args.prompt, params):
            printer.write("content", d.text)
            reason = d.finish_reason or reason
    else:
        for chunk in llm.chat_stream(messages, tools, params, enable_thinking=not args.no_thinking):
            d = chunk.delta
            if d is None:
                reason = chunk.finish_reason
            elif d.reasoning_content:
                printer.write("reasoning", d.reasoning_content)
            elif d.content:
                printer.write("content", d.content)
            elif d.tool_calls:
                call = d.tool_calls[0]
                printer.write("tool", (f"{call.name} " if call.name else "") + call.arguments)
    printer.out.write(f"\n[{reason}]\n" if printer.color else "\n")
    return 0
