"""`glm47` on the command line: one subcommand per module in glm47/cli/, each exposing
`register(subparsers)` (adds its parser and sets `func`). Argument parsing only; the work is in the library."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `glm47 --help` lists them.
COMMANDS = ["chat", "generate", "serve", "bench", "init", "plan", "train", "evaluate"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glm47", description="GLM-4.7: model, prompt format, engine and serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"glm47.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except ValueError as e:  # bad input: a clear message and exit code 2, never a traceback
        print(f"glm47 {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
