"""`glm47 evaluate`: score a checkpoint on held-out agent conversations (tool calls, answers, thinking
switch, MTP agreement, expert load) and print the metrics against their targets."""

from __future__ import annotations

import argparse
import json
import sys

from glm47.cli.train import quiet_idle_threads


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="score a checkpoint on held-out agent conversations",
                       description="Greedy-decode held-out conversations of the synthetic corpus and report tool-call "
                                   "validity, answer accuracy, no-tool and thinking-off behaviour, MTP draft "
                                   "agreement and expert load.")
    p.add_argument("--model", required=True, help="checkpoint directory (with tokenizer.json)")
    p.add_argument("--n", type=int, default=200, help="held-out conversations (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--failures", action="store_true", help="also print a few failed cases per metric")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    quiet_idle_threads()
    from glm47.evaluate import evaluate

    if args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    report = evaluate(args.model, args.n, args.seed, args.max_new_tokens, progress=sys.stderr.isatty())
    if args.json:
        print(json.dumps({"metrics": report.metrics(), "passed": report.passed(),
                          "expert_load_per_layer": report.expert_load}, indent=2))
    else:
        print(report.format())
    if args.failures:
        for f in report.failures:
            print(json.dumps(f, ensure_ascii=False))
    return 0
