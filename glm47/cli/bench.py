"""`glm47 bench`: the engine's speed on a checkpoint (or a random `bench`-preset model): batch-1 decode
against the memory-bandwidth roofline, concurrent throughput, long prefill, prefix-cache time to first token.
benchmarks/bench_engine.py runs the same measurements next to transformers."""

from __future__ import annotations

import argparse
import tempfile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure the engine's decode, batch, prefill and prefix-cache speed",
                       description="Measures the engine on --model (default: a random model of the `bench` "
                                   "preset written to a temporary directory).")
    p.add_argument("--model", help="checkpoint directory (default: a random `bench`-preset model)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--concurrent", type=int, default=16)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--history", type=int, default=3000)
    p.add_argument("--kv-cache-tokens", type=int, default=16384)
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    import torch

    from glm47.bench import (active_weight_bytes, cpu_report, greedy, measure_bandwidth, prefix_cache_ttft,
                             random_prompt, run)
    from glm47.checkpoint.loader import load_model
    from glm47.checkpoint.writer import init_checkpoint
    from glm47.config import preset
    from glm47.engine.config import EngineConfig
    from glm47.engine.llm_engine import LLMEngine

    for name in ("decode_tokens", "concurrent", "prefill", "history", "kv_cache_tokens"):
        if getattr(args, name) < 2:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 2")
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model
        if path is None:
            print("writing a random `bench`-preset model ...", flush=True)
            init_checkpoint(preset("bench"), tmp, seed=0, mtp=False)
            path = tmp
        model = load_model(path, dtype=getattr(torch, args.dtype))
    V = model.config.vocab_size

    def engine(**kw) -> LLMEngine:
        return LLMEngine(model, EngineConfig(kv_cache_tokens=args.kv_cache_tokens, **kw))

    print(cpu_report(model))
    with torch.inference_mode():
        t = run(engine(), [random_prompt(64, V, 1)], greedy(args.decode_tokens))
        bw = measure_bandwidth()
        roof = bw / active_weight_bytes(model)
        print(f"batch-1 decode      {t.decode_tokens_per_s:8.1f} tok/s  ({100 * t.decode_tokens_per_s / roof:.0f} % "
              f"of the {roof:.1f} tok/s memory-bandwidth roofline)")
        B = args.concurrent
        prompts = [random_prompt(32 + 8 * i, V, 100 + i) for i in range(B)]
        t = run(engine(), prompts, greedy(64))
        roof = B * bw / active_weight_bytes(model, B)  # a step reads the experts any of the B tokens uses
        print(f"{B:2d} concurrent       {t.tokens_per_s:8.1f} tok/s total  ({100 * t.tokens_per_s / roof:.0f} % of the "
              f"{roof:.0f} tok/s roofline of {B}-token decode steps, prefill included in the time)")
        t = run(engine(), [random_prompt(args.prefill, V, 2)], greedy(1))
        print(f"prefill {args.prefill:5d}       {args.prefill / t.ttft:8.1f} tok/s  (TTFT {t.ttft * 1e3:.0f} ms)")
        on, _ = prefix_cache_ttft(engine(), args.history, 50)
        off, _ = prefix_cache_ttft(engine(enable_prefix_caching=False), args.history, 50)
        print(f"second turn TTFT    {on * 1e3:8.0f} ms with prefix caching, {off * 1e3:.0f} ms without "
              f"({off / on:.1f}x)")
    return 0
