"""`glm47 train`: train the nano GLM-4.7 from scratch (or resume it) into a checkpoint directory."""

from __future__ import annotations

import argparse
import os
import sys

from glm47.training.recipe import TrainConfig

D = TrainConfig()  # the defaults, for the help text


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train the nano GLM-4.7 on the synthetic agent corpus (CPU)",
                       description="Train a nano GLM-4.7 from scratch: corpus, BPE tokenizer, model init and data "
                                   "order all follow --seed, so the same command gives the same checkpoint. "
                                   "Writes the official layout (bf16) + tokenizer.json to --out, plus "
                                   "train_state.pt for --resume.")
    p.add_argument("--out", required=True, help="checkpoint directory to write")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (settings from there)")
    p.add_argument("--steps", type=int, help=f"total optimizer steps (default {D.steps})")
    p.add_argument("--seed", type=int, help=f"seed of the corpus, tokenizer, init and data order (default {D.seed})")
    p.add_argument("--examples", type=int, help=f"training conversations to generate (default {D.examples})")
    p.add_argument("--batch-size", type=int, help=f"conversations per step (default {D.batch_size})")
    p.add_argument("--lr", type=float, help=f"peak learning rate, Muon and AdamW (default {D.lr:g})")
    p.add_argument("--warmup-steps", type=int, help=f"linear warmup steps (default {D.warmup_steps})")
    p.add_argument("--mtp-weight", type=float, help=f"weight of the MTP loss (default {D.mtp_weight:g})")
    p.add_argument("--bias-rate", type=float, help=f"expert-balancing bias step per update (default {D.bias_rate:g})")
    p.add_argument("--adamw-only", action="store_true", default=None, help="AdamW for every parameter (no Muon)")
    p.add_argument("--no-autocast", dest="autocast", action="store_false", default=None,
                   help="train in float32 instead of bf16 autocast")
    p.add_argument("--vocab-size", type=int, help=f"tokenizer size incl. the 36 added tokens (default {D.vocab_size})")
    p.add_argument("--save-every", type=int, help=f"steps between checkpoints (default {D.save_every})")
    p.add_argument("--threads", type=int, help="torch threads (default: all cores)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None)
    p.set_defaults(func=run)


def quiet_idle_threads() -> None:
    """Let idle OpenMP threads sleep instead of spin. On a small shared machine a spinning worker competes
    with its own siblings whenever another process takes a core, and steps get 10x slower (measured on 2
    cores). Only effective before torch is first imported; an explicit OMP_WAIT_POLICY wins."""
    if "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


SETTINGS = ("steps", "seed", "examples", "batch_size", "lr", "warmup_steps", "mtp_weight", "bias_rate", "adamw_only",
            "autocast", "vocab_size", "save_every")


def run(args: argparse.Namespace) -> int:
    quiet_idle_threads()
    import logging

    import torch

    from glm47.training.recipe import TrainConfig
    from glm47.training.train import resumed_config, train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    changes = {k: getattr(args, k) for k in SETTINGS if getattr(args, k) is not None}
    cfg = resumed_config(args.out, **changes) if args.resume else TrainConfig(**changes)
    summary = train(cfg, args.out, resume=args.resume, progress=args.progress)
    print(f"trained {summary.steps} steps in {summary.seconds / 60:.1f} min "
          f"({summary.tokens / max(summary.seconds, 1e-9):.0f} tokens/s): loss {summary.loss:.3f} "
          f"(lm {summary.lm_loss:.3f}, mtp {summary.mtp_loss:.3f}); expert load max/mean "
          + " ".join(f"{r:.2f}" for r in summary.load_ratios))
    print(f"checkpoint: {os.path.abspath(args.out)}")
    return 0
