"""Speculative decoding with the MTP layer against plain decoding, same engine, same weights, same run.

    python benchmarks/bench_spec.py [--tokens 128] [--batch 1,8] [--drafts 1,2,3] [--repeat 3] [--random-bench]

The embedded nano model (trained: its MTP layer predicts well) answers chat prompts greedily; each figure is the
best of `repeat` runs, plain and speculative taking turns. Printed: decode tokens/s, the ratio to plain decoding,
the share of drafts accepted, tokens a sequence gets per step (1 + its accepted drafts), and whether the tokens
are plain decoding's. Nothing is asserted. What a step costs more: it verifies 1 + k rows per sequence (about
the price of one row only while reading the weights dominates) and drafting runs the MTP layer and the LM head
once per draft. The nano model's weights sit in the CPU caches, so rows are not free there: fewer steps pay at
batch 1, not at batch 8.

--random-bench adds the engine benchmark's random GLM-4.7-shaped model (bench preset) with a random MTP layer:
its drafts are never right, so this measures what drafting costs when it buys nothing (on that model one draft
reads the 310 MB LM head once more, next to ~500 MB of weights a token).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from glm47.assets import default_model_path
from glm47.bench import random_prompt
from glm47.chat.template import render_ids
from glm47.chat.tokenizer import Tokenizer
from glm47.checkpoint.loader import load_model
from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset
from glm47.engine.config import EngineConfig
from glm47.engine.llm_engine import LLMEngine
from glm47.engine.sampling import SamplingParams

QUESTIONS = ["What is 17 + 25?", "Write a haiku about rain.", "Convert 3 miles to km.", "What day is 2026-03-01?",
             "What is the weather in Paris?", "Say hello.", "What is 9 * 8?", "Tell me a joke."]


def run(model, prompts: list[list[int]], k: int, tokens: int) -> tuple[float, list[list[int]], LLMEngine]:
    """Decode seconds (after the prompts' prefill step), the tokens, the engine (for its stats)."""
    e = LLMEngine(model, EngineConfig(kv_cache_tokens=16384, num_speculative_tokens=k))
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    for p in prompts:
        e.add_request(p, params)
    out: dict[str, list[int]] = {}
    start = None
    while e.has_unfinished():
        for o in e.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
        start = start or time.perf_counter()  # after the first step: the prefill
    return time.perf_counter() - start, [out[r] for r in sorted(out, key=int)], e


def table(model, prompt_sets: dict[int, list[list[int]]], drafts: list[int], tokens: int, repeat: int) -> None:
    print(f"{'batch':>5s} {'drafts':>6s} {'tok/s':>9s} {'vs plain':>9s} {'accepted':>9s} {'tok/step':>9s}  same tokens")
    for batch, prompts in prompt_sets.items():
        n = batch * (tokens - 1)  # decode tokens: the first of each comes from the prefill step
        for i, k in enumerate(drafts):
            plain, spec = [], []
            for _ in range(repeat):
                t0, want, _ = run(model, prompts, 0, tokens)
                t1, got, e = run(model, prompts, k, tokens)
                plain.append(t0)
                spec.append(t1)
            s = e.stats()
            if i == 0:
                print(f"{batch:5d} {0:6d} {n / min(plain):9.1f} {1:8.2f}x")
            print(f"{batch:5d} {k:6d} {n / min(spec):9.1f} {min(plain) / min(spec):8.2f}x "
                  f"{s.spec_accepted_tokens / max(s.spec_draft_tokens, 1):9.0%} "
                  f"{1 + k * s.spec_accepted_tokens / max(s.spec_draft_tokens, 1):9.2f}  {got == want}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--drafts", default="1,2,3")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--random-bench", action="store_true", help="also the random bench-preset model (slow)")
    args = ap.parse_args()
    path = default_model_path()
    tok = Tokenizer.from_dir(path)
    model = load_model(path, dtype=torch.bfloat16)
    print(f"embedded nano model, bf16, {torch.get_num_threads()} threads, greedy, {args.tokens} tokens a request; "
          f"best of {args.repeat}, plain and speculative taking turns")
    batches, drafts = [int(b) for b in args.batch.split(",")], [int(k) for k in args.drafts.split(",")]
    with torch.inference_mode():
        table(model, {b: [render_ids(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}])
                          for i in range(b)] for b in batches}, drafts, args.tokens, args.repeat)
        if args.random_bench:
            cfg = preset("bench")
            with tempfile.TemporaryDirectory() as d:
                init_checkpoint(cfg, d, seed=0, mtp=True)
                model = load_model(d, dtype=torch.bfloat16)
                print(f"\nrandom bench-preset model with a random MTP layer, {args.tokens // 4} tokens a request, "
                      f"64-token random prompts")
                table(model, {b: [random_prompt(64, cfg.vocab_size, 1 + i) for i in range(b)] for b in (1, 16)},
                      drafts[:1], args.tokens // 4, args.repeat)


if __name__ == "__main__":
    main()
