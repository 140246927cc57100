"""`train`: a nano GLM-4.7 from scratch on the synthetic agent corpus, on CPU. Seeded end to end (corpus,
tokenizer, init, data order), resumable, and its output is a checkpoint in the official layout.

    out/config.json, generation_config.json (the trained tokenizer's stop ids), model.safetensors (bf16),
    out/tokenizer.json                      the trained BPE with GLM-4.7's 36 added tokens
    out/train_state.pt                      float32 weights, optimizer state, step, RNG: for --resume only
    out/train_log.jsonl                     one line per step

One step: a batch of conversations, next-token + MTP loss on assistant tokens (loss.py) under bf16
autocast, gradient clipping, Muon + AdamW (optim.py), then the balancing-bias nudge (balance.py).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from glm47.chat.tokenizer import Tokenizer
from glm47.checkpoint.writer import save_checkpoint
from glm47.config import ModelConfig
from glm47.model.glm4_moe import Glm4MoeForCausalLM
from glm47.training.balance import ExpertLoadTracker, load_ratio
from glm47.training.corpus import generate_examples, training_text
from glm47.training.data import BatchSchedule, encode_example
from glm47.training.loss import training_loss
from glm47.training.optim import build_optimizers, lr_at, set_lr
from glm47.training.recipe import TrainConfig
from glm47.training.train_tokenizer import train_tokenizer

log = logging.getLogger("glm47")
STATE_FILE = "train_state.pt"
LOG_FILE = "train_log.jsonl"
TOKENIZER_EXAMPLES = 4000  # the BPE saturates well before this many conversations
# Settings that may change on --resume without changing what was trained so far.
RESUMABLE_CHANGES = {"steps", "save_every"}


@dataclass(slots=True)
class TrainSummary:
    steps: int
    loss: float  # mean loss over the last 50 steps
    lm_loss: float
    mtp_loss: float
    tokens: int  # real (non-padding) tokens processed in this run
    seconds: float
    load_ratios: list[float]  # max/mean expert load per MoE layer over the last (up to) 50 steps


def model_config(cfg: TrainConfig, tokenizer: Tokenizer) -> ModelConfig:
    """The recipe's shape over the trained tokenizer: its size (rounded up to a multiple of 64) and stop ids."""
    vocab = -(-tokenizer.vocab_size // 64) * 64
    eos = list(tokenizer.eos_token_ids)
    return ModelConfig(**{**cfg.model, "vocab_size": vocab, "eos_token_id": eos, "pad_token_id": eos[0]})


@torch.no_grad()
def init_weights(model: Glm4MoeForCausalLM, seed: int) -> None:
    """GPT-2 style: N(0, initializer_range) for matrices and embeddings, residual output projections scaled
    by 1/sqrt(2 * layers), norms at 1, biases and the balancing bias at 0. Seeded, in parameter order."""
    cfg = model.config
    std = cfg.initializer_range
    depth = cfg.num_hidden_layers + len(model.mtp)
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0 if "norm" in name else 0.0)
            continue
        s = std / math.sqrt(2 * depth) if name.endswith(("o_proj.weight", "down_proj.weight", "experts.w2")) else std
        p.copy_(torch.randn(p.shape, generator=g) * s)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.zero_()


def build_tokenizer(cfg: TrainConfig, examples) -> Tokenizer:
    return train_tokenizer(training_text(examples[:TOKENIZER_EXAMPLES]), cfg.vocab_size)


def load_train_state(out: str | Path) -> dict:
    path = Path(out) / STATE_FILE
    if not path.is_file():
        raise ValueError(f"nothing to resume: {path} does not exist")
    return torch.load(path, map_location="cpu", weights_only=False)


def resumed_config(out: str | Path, **changes) -> TrainConfig:
    """The TrainConfig of the run saved in `out`, with `changes` (e.g. more steps) applied."""
    saved = TrainConfig(**load_train_state(out)["config"])
    return dataclasses.replace(saved, **{k: v for k, v in changes.items() if v is not None})


def train(cfg: TrainConfig, out: str | Path, resume: bool = False, progress: bool | None = None) -> TrainSummary:
    """Trains per `cfg` and writes the checkpoint to `out` (every cfg.save_every steps and at the end).
    resume: continue the run saved in `out` (its config must equal `cfg` except steps/save_every); the
    result is bit-identical to an uninterrupted run."""
    # NOTE a major footgun: within a few steps optimizer moments and small gradients turn denormal,
    # and every CPU op touching them gets 10-30x slower. Flushing them to zero changes nothing we measure.
    torch.set_flush_denormal(True)
    try:
        return _train(cfg, Path(out), resume, progress)
    finally:
        torch.set_flush_denormal(False)


def _train(cfg: TrainConfig, out: Path, resume: bool, progress: bool | None) -> TrainSummary:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    state = load_train_state(out) if resume else None
    if state is not None:
        differ = {k for k, v in asdict(cfg).items() if state["config"].get(k) != v} - RESUMABLE_CHANGES
        if differ:
            raise ValueError(f"cannot resume {out} with different settings: "
                             + ", ".join(f"{k}={getattr(cfg, k)!r} (saved {state['config'][k]!r})" for k in sorted(differ)))

    t0 = time.perf_counter()
    examples = generate_examples(cfg.examples, cfg.seed, "train")
    if state is not None and not (out / "tokenizer.json").is_file():
        raise ValueError(f"cannot resume {out}: its tokenizer.json is missing")
    tokenizer = Tokenizer.from_dir(out) if state is not None else build_tokenizer(cfg, examples)
    rows = [encode_example(tokenizer, ex) for ex in examples]
    config = model_config(cfg, tokenizer)
    schedule = BatchSchedule(rows, cfg.batch_size, cfg.seed, config.pad_token_id, cfg.max_len)
    log.info("corpus: %d conversations, %d tokens, %.1f s", len(rows), sum(len(r[0]) for r in rows),
             time.perf_counter() - t0)

    model = Glm4MoeForCausalLM(config)
    init_weights(model, cfg.seed)
    optimizers = build_optimizers(model, cfg.lr, cfg.weight_decay, cfg.adamw_only)
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        for opt, s in zip(optimizers, state["optimizers"], strict=True):
            opt.load_state_dict(s)
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        start = state["step"]
    model.train()
    tracker = ExpertLoadTracker(model)
    window = torch.zeros_like(tracker.counts)  # loads since the last report
    history: list[tuple[float, float, float]] = []
    tokens, t_run = 0, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, disable=not (sys.stderr.isatty() if progress is None else progress),
               desc="train", unit="step", dynamic_ncols=True)
    last_ratios: list[float] = []
    with open(out / LOG_FILE, "a" if resume else "w") as logf:
        for step in range(start, cfg.steps):
            t_step = time.perf_counter()
            lr = lr_at(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)
            set_lr(optimizers, lr)
            batch = schedule.batch(step)
            tracker.valid = batch.valid
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.autocast):
                parts = training_loss(model, batch.input_ids, batch.loss_mask, cfg.mtp_weight)
            parts.loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            for opt in optimizers:
                opt.step()
                opt.zero_grad(set_to_none=True)
            window += tracker.counts
            tracker.rebalance(cfg.bias_rate)

            n = batch.num_tokens
            tokens += n
            dt = time.perf_counter() - t_step
            history.append((parts.loss.item(), parts.lm.item(), parts.mtp.item()))
            ratios = tracker_ratios(window)
            record = dict(step=step + 1, loss=round(history[-1][0], 4), lm=round(history[-1][1], 4),
                          mtp=round(history[-1][2], 4), lr=lr, grad_norm=round(grad_norm, 3), tokens=n,
                          tok_s=round(n / dt), load_max=round(max(ratios, default=0.0), 3))
            logf.write(json.dumps(record) + "\n")
            logf.flush()
            bar.set_postfix(loss=f"{record['loss']:.3f}", mtp=f"{record['mtp']:.3f}",
                            tok_s=f"{tokens / (time.perf_counter() - t_run):.0f}", load=f"{record['load_max']:.2f}")
            bar.update()
            if (step + 1) % 50 == 0:
                bar.write(f"step {step + 1}: loss {record['loss']:.3f} (lm {record['lm']:.3f}, mtp {record['mtp']:.3f}) "
                          f"lr {lr:.2e}, expert load max/mean per layer " + " ".join(f"{r:.2f}" for r in ratios))
                last_ratios = ratios
                window.zero_()
            if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
                save(out, model, tokenizer, optimizers, step + 1, cfg)
    bar.close()
    tracker.close()
    recent = history[-50:] or [(float("nan"),) * 3]
    mean = [sum(h[i] for h in recent) / len(recent) for i in range(3)]
    return TrainSummary(cfg.steps, mean[0], mean[1], mean[2], tokens, time.perf_counter() - t_run,
                        tracker_ratios(window) if window.any() else last_ratios)


def tracker_ratios(counts: torch.Tensor) -> list[float]:
    return [round(float(r), 3) for r in load_ratio(counts)]


def save(out: Path, model: Glm4MoeForCausalLM, tokenizer: Tokenizer, optimizers: list, step: int,
         cfg: TrainConfig) -> None:
    """The shippable checkpoint (bf16, official layout, tokenizer.json) and, beside it, the exact training
    state. tokenizer.json and the state are replaced atomically, so --resume never reads half a file."""
    save_checkpoint(model, out, torch.bfloat16, max_shard_bytes=None)
    tmp = out / "tokenizer.json.tmp"
    tokenizer.hf_tokenizer.save(str(tmp))
    os.replace(tmp, out / "tokenizer.json")
    state = {"step": step, "config": asdict(cfg), "model": model.state_dict(),
             "optimizers": [opt.state_dict() for opt in optimizers],
             "rng": {"torch": torch.get_rng_state(), "python": random.getstate()}}
    torch.save(state, out / (STATE_FILE + ".tmp"))
    os.replace(out / (STATE_FILE + ".tmp"), out / STATE_FILE)
