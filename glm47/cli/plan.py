"""`glm47 plan`: how many GPUs and how much memory a model needs for a context and batch, with the arithmetic.

Exit codes: 0 it fits (min GPUs found), 1 it does not fit on the largest degree considered, 2 bad input.
"""

from __future__ import annotations

import argparse
import json

from glm47.config import PRESETS, resolve_config
from glm47.planner import DEFAULT_MEM_FRACTION, GPUS, format_plan, plan

MODELS = [name for name in PRESETS if name.startswith("glm-")]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="GPUs and memory needed for a context length, batch and format",
                       description="Count parameters, weight and KV-cache bytes, and the fewest GPUs (tensor-"
                                   "parallel degree) whose usable memory holds them. Exit 0 if it fits, 1 if it "
                                   "does not fit on the largest degree considered, 2 on bad input.")
    p.add_argument("--model", default="glm-4.7",
                   help=f"a preset ({', '.join(MODELS)}) or a config.json / checkpoint directory (default glm-4.7)")
    p.add_argument("--quant", choices=["bf16", "fp8"], default="fp8", help="weight format (default fp8)")
    p.add_argument("--gpu", default="h100", help=f"{', '.join(GPUS)}, or custom:GB (default h100)")
    p.add_argument("--context", required=True, metavar="TOKENS",
                   help="tokens per sequence (prompt + output), or 'max' for the model's maximum")
    p.add_argument("--batch", type=_int, default=1, metavar="N", help="concurrent sequences (default 1)")
    p.add_argument("--kv-dtype", choices=["auto", "bf16", "fp8"], default="auto",
                   help="KV cache element type; auto: FP8 with FP8 weights, else BF16")
    p.add_argument("--mem-fraction", type=float, default=DEFAULT_MEM_FRACTION,
                   help=f"fraction of each GPU's memory for weights + KV cache (default {DEFAULT_MEM_FRACTION})")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer (its weights and KV cache)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)


def _int(text: str) -> int:
    try:
        return int(text.replace(",", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args.model)
    context = config.max_position_embeddings if args.context.strip().lower() == "max" else _context(args.context)
    result = plan(config, gpu=args.gpu, quant=args.quant, context=context, batch=args.batch,
                  kv_dtype=args.kv_dtype, mem_fraction=args.mem_fraction, mtp=not args.no_mtp, name=args.model)
    print(json.dumps(result.to_json(), indent=2) if args.json else format_plan(result))
    return 0 if result.min_gpus is not None else 1


def _context(text: str) -> int:
    try:
        return int(text.replace(",", ""))
    except ValueError:
        raise ValueError(f"--context {text!r} is not a number of tokens (or 'max')") from None

