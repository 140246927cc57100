"""`glm47 init`: write a random-initialised checkpoint of a preset or config in the official layout."""

from __future__ import annotations

import argparse

from glm47.config import PRESETS, resolve_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("init", help="write a random checkpoint (official layout) of a preset or config",
                       description="Write a seeded random checkpoint: config.json, generation_config.json and "
                                   "safetensors weights, sharded when asked.")
    p.add_argument("model", help=f"a preset ({', '.join(PRESETS)}) or a config.json / checkpoint directory")
    p.add_argument("output", help="directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--shard-size", default="5GB", help="maximum shard size, e.g. 500MB, 5GB (default 5GB)")
    p.add_argument("--no-mtp", action="store_true", help="leave out the MTP layer")
    p.add_argument("--std", type=float, default=None, help="weight std (default: the config's initializer_range)")
    p.set_defaults(func=run)


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    t = text.strip().upper()
    for unit, factor in sorted(units.items(), key=lambda u: -len(u[0])):
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            break
    else:
        number, factor = t, 1
    try:
        value = float(number) * factor
    except ValueError:
        raise ValueError(f"--shard-size {text!r} is not a size like 500MB or 5GB") from None
    if value <= 0:
        raise ValueError(f"--shard-size {text!r} must be positive")
    return int(value)


def run(args: argparse.Namespace) -> int:
    import torch

    from glm47.checkpoint.writer import init_checkpoint

    config = resolve_config(args.model)
    files = init_checkpoint(config, args.output, seed=args.seed, dtype=getattr(torch, args.dtype),
                            max_shard_bytes=parse_size(args.shard_size), mtp=not args.no_mtp, std=args.std)
    print(f"wrote {args.output}: {len(files)} weight file(s), seed {args.seed}, {args.dtype}")
    return 0
