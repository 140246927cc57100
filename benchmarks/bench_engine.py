"""The engine against transformers on the same weights: a random GLM-4.7-shaped bf16 model (the `bench`
preset: vocab 151552, hidden 1024, 8 layers, 16 heads, 2 KV heads, head_dim 128, 64 experts top-8 of width
256 + 1 shared, dense width 3072, first layer dense), on this machine's CPU. Prints ratios measured in this
run; nothing is asserted.

    python benchmarks/bench_engine.py [--decode-tokens 64] [--concurrent 16] [--prefill 2048] [--history 3000]
                                      [--repeat 3] [--parts memory,decode,concurrent,prefill,prefix]

Run it on a quiet machine with OpenMP's default wait policy (both sides use the same threads: setting
OMP_WAIT_POLICY=PASSIVE costs every parallel region ~30 us of wake-up on a 2-core VM, which slows both).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import psutil
import torch

from glm47.bench import (active_weight_bytes, cpu_report, greedy, measure_bandwidth, measure_bf16_flops,
                         prefill_flops, prefix_cache_ttft, random_prompt, run)
from glm47.checkpoint.loader import load_model
from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset
from glm47.engine.config import EngineConfig
from glm47.engine.llm_engine import LLMEngine


def hf_generate_time(ref, batch: list[list[int]], new_tokens: int) -> float:
    """Wall time of transformers' greedy generate for a left-padded batch."""
    width = max(map(len, batch))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    t = time.perf_counter()
    ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                 do_sample=False, pad_token_id=0)
    return time.perf_counter() - t


PARTS = ("memory", "decode", "concurrent", "prefill", "prefix")


def rss() -> int:
    return psutil.Process(os.getpid()).memory_info().rss


def memory_child(checkpoint: str) -> None:
    """Runs in a fresh process (no transformers, no checkpoint writing before): resident memory of the
    runtime (Python + torch + glm47 imported), then of the engine after loading and serving a 512-token
    prompt. The engine's memory is the difference; the target is weights + KV pool + 15 %."""
    base = rss()
    with torch.inference_mode():
        model = load_model(checkpoint, dtype=torch.bfloat16)
        e = LLMEngine(model, EngineConfig(kv_cache_tokens=16384, max_num_batched_tokens=2048))
        run(e, [random_prompt(512, model.config.vocab_size, 9)], greedy(16))
    total = rss()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    pool = 2 * e.runner.kv.k.numel() * e.runner.kv.k.element_size()
    print(f"memory: runtime (python + torch) {base / 1e9:.2f} GB; engine {(total - base) / 1e9:.2f} GB for weights "
          f"{weights / 1e9:.2f} GB + KV pool {pool / 1e9:.2f} GB = {(weights + pool) / 1e9:.2f} GB -> ratio "
          f"{(total - base) / (weights + pool):.2f} (whole process {total / 1e9:.2f} GB, "
          f"{total / (weights + pool):.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--concurrent-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--history", type=int, default=3000)
    ap.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best counts")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ",".join(PARTS))
    ap.add_argument("--memory-child", metavar="DIR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child)
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        raise SystemExit(f"unknown --parts {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    import transformers

    config = preset("bench")
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        init_checkpoint(config, d, seed=0, mtp=False)
        model = load_model(d, dtype=torch.bfloat16)
        V = config.vocab_size

        def engine(**kw) -> LLMEngine:
            return LLMEngine(model, EngineConfig(kv_cache_tokens=16384, max_num_batched_tokens=2048, **kw))

        rows = []
        # --- memory: the engine's resident set against weights + KV pool, in a fresh process
        if "memory" in parts:
            child = subprocess.run([sys.executable, __file__, "--memory-child", d], capture_output=True, text=True)
            print(child.stdout.strip() or child.stderr)

        if parts - {"memory"}:
            ref = transformers.Glm4MoeForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
        bw = measure_bandwidth()
        print(f"read bandwidth (torch.sum of 1 GiB, median of 7): {bw / 1e9:.1f} GB/s; {torch.get_num_threads()} "
              f"threads; each figure is the best of {args.repeat} runs, glm47 and transformers taking turns")
        print(cpu_report(model))

        def best(ours, theirs) -> tuple[float, float]:
            """Seconds: the best of `repeat` runs of each, alternating, so that both see the same machine."""
            a, b = [], []
            for _ in range(args.repeat):
                a.append(ours())
                b.append(theirs())
            return min(a), min(b)

        # --- 1. batch-1 decode, and the roofline
        if "decode" in parts:
            p = random_prompt(64, V, 1)
            n = args.decode_tokens

            def ours() -> float:
                t = run(engine(), [p], greedy(n))
                return (t.total - t.ttft) / (n - 1)

            def theirs() -> float:
                return (hf_generate_time(ref, [p], n) - hf_generate_time(ref, [p], 1)) / (n - 1)

            a, b = best(ours, theirs)
            rows.append(("batch-1 decode tok/s", 1 / a, 1 / b))
            active = active_weight_bytes(model)
            roof = bw / active
            print(f"roofline: {active / 1e6:.0f} MB active weights per token / {bw / 1e9:.1f} GB/s "
                  f"= {roof:.1f} tok/s; glm47 decode reaches {100 / a / roof:.0f} % of it")

        # --- 2. concurrent requests, total tokens/s (prefill included, as transformers' generate includes it)
        if "concurrent" in parts:
            B, n = args.concurrent, args.concurrent_tokens
            prompts = [random_prompt(32 + 8 * i, V, 100 + i) for i in range(B)]
            a, b = best(lambda: run(engine(), prompts, greedy(n)).total,
                        lambda: hf_generate_time(ref, prompts, n))
            rows.append((f"{B} concurrent tok/s", B * n / a, B * n / b))
            active = active_weight_bytes(model, B)
            flops, peak = prefill_flops(model, [len(p) for p in prompts]), measure_bf16_flops()
            bound = B * n / (flops / peak + (n - 1) * active / bw)  # tok/s at the compute and bandwidth peaks
            print(f"{B} concurrent: the prefill is {flops / 1e9:.0f} GFLOP ({flops / peak:.2f} s at the "
                  f"{peak / 1e9:.0f} GFLOPS a bf16 GEMM reaches here), each of the {n - 1} decode steps reads "
                  f"~{active / 1e6:.0f} MB "
                  f"(the experts {B} tokens touch; {active / bw * 1e3:.1f} ms at {bw / 1e9:.1f} GB/s) -> at most "
                  f"{bound:.0f} tok/s; 5x transformers would be {5 * B * n / b:.0f} tok/s = "
                  f"{100 * 5 * B * n / b / bound:.0f} % of that bound; glm47 reaches {100 * B * n / a / bound:.0f} %")

        # --- 3. long-prompt prefill (time to first token)
        if "prefill" in parts:
            p = random_prompt(args.prefill, V, 2)
            a, b = best(lambda: run(engine(), [p], greedy(1)).ttft, lambda: hf_generate_time(ref, [p], 1))
            rows.append((f"prefill {args.prefill} tok/s", args.prefill / a, args.prefill / b))

        # --- 4. second turn of a long conversation: prefix caching on vs off
        if "prefix" in parts:
            on, computed_on = prefix_cache_ttft(engine(), args.history, 50)
            off, computed_off = prefix_cache_ttft(engine(enable_prefix_caching=False), args.history, 50)
            print(f"second turn of a {args.history}-token conversation: TTFT {on * 1e3:.0f} ms with prefix caching "
                  f"({computed_on} prompt tokens computed) vs {off * 1e3:.0f} ms without ({computed_off}): "
                  f"{off / on:.1f}x")

        print(f"\n{'':28s}{'glm47':>12s}{'transformers':>14s}{'ratio':>8s}")
        for name, a, b in rows:
            print(f"{name:28s}{a:12.1f}{b:14.1f}{a / b:7.2f}x")


if __name__ == "__main__":
    main()
