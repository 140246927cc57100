"""CPU decode on huge pages and on a busy machine, in one run, on a random `bench`-preset model (bf16):

    python benchmarks/bench_cpu_sharing.py [--decode-tokens 64] [--concurrent 16] [--repeat 3] [--busy-seconds 240]

(a) quiet: batch-1 decode and `concurrent` requests, the weights on transparent huge pages against the same
    weights on 4 KB pages (two copies of the model loaded in this process, measured taking turns);
(b) while a competing process keeps one core 100 % busy (started here, ended here, and ending itself after
    --busy-seconds in any case): the same figures with the ThreadGovernor (decode steps on the cores left free)
    and with a fixed thread count, each as a share of the quiet figure.
Every figure is the median of --repeat runs; ratios are of this run. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from glm47.bench import cpu_report, greedy, random_prompt, run
from glm47.checkpoint.loader import load_model
from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset
from glm47.engine.config import EngineConfig
from glm47.engine.llm_engine import LLMEngine
from glm47.model.memory import anon_huge_bytes

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"


def load(path: str, huge: bool):
    os.environ["GLM47_HUGE_PAGES"] = "1" if huge else "0"
    before = anon_huge_bytes() or 0
    model = load_model(path, dtype=torch.bfloat16, progress=False)
    got = (anon_huge_bytes() or 0) - before
    os.environ.pop("GLM47_HUGE_PAGES")
    return model, got


def measure(engines: dict, prompts: dict, tokens: int, repeat: int) -> dict:
    """{(engine name, workload): median tokens/s}: batch-1 decode speed, and total speed of the concurrent batch;
    the engines take turns in every round."""
    runs = {(name, w): [] for name in engines for w in prompts}
    for _ in range(repeat):
        for name, engine in engines.items():
            for w, batch in prompts.items():
                t = run(engine, batch, greedy(tokens))
                runs[name, w].append(t.decode_tokens_per_s if len(batch) == 1 else t.tokens_per_s)
    return {key: statistics.median(v) for key, v in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--concurrent", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--busy-seconds", type=float, default=240.0, help="the competing process ends itself after this")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        print("writing a random `bench`-preset model ...", flush=True)
        init_checkpoint(preset("bench"), tmp, seed=0, mtp=False)
        huge, got = load(tmp, huge=True)
        plain, _ = load(tmp, huge=False)
    print(cpu_report(huge))
    print(f"huge pages obtained for the huge-page copy: {got / 1e9:.2f} GB")
    V = huge.config.vocab_size
    prompts = {"batch-1": [random_prompt(64, V, 1)],
               f"{args.concurrent} concurrent": [random_prompt(32 + 8 * i, V, 100 + i) for i in range(args.concurrent)]}
    kv = dict(kv_cache_tokens=16384)
    with torch.inference_mode():
        engines = {"huge pages": LLMEngine(huge, EngineConfig(**kv)),
                   "4 KB pages": LLMEngine(plain, EngineConfig(**kv))}
        for e in engines.values():  # warm-up: kernels, allocator, first touches
            run(e, prompts["batch-1"], greedy(8))
        quiet = measure(engines, prompts, args.decode_tokens, args.repeat)

        busy_engines = {"adaptive threads": engines["huge pages"],
                        "fixed threads": LLMEngine(huge, EngineConfig(adaptive_threads=False, **kv))}
        competitor = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=args.busy_seconds)])
        try:
            for e in busy_engines.values():  # the governor sees the competitor (two readings of 0.5 s)
                run(e, prompts["batch-1"], greedy(32))
            busy = measure(busy_engines, prompts, args.decode_tokens, args.repeat)
        finally:
            competitor.kill()
            competitor.wait()

    print(f"\n(a) quiet machine, tokens/s (median of {args.repeat}):")
    for w in prompts:
        a, b = quiet["huge pages", w], quiet["4 KB pages", w]
        print(f"  {w:16s} huge pages {a:7.1f}   4 KB pages {b:7.1f}   ratio {a / b:.2f}x")
    print("(b) one core kept busy by another process, as a share of the quiet figure (huge pages):")
    for w in prompts:
        q = quiet["huge pages", w]
        line = "   ".join(f"{name} {busy[name, w]:7.1f} ({busy[name, w] / q:.2f}x)" for name in busy_engines)
        print(f"  {w:16s} {line}")


if __name__ == "__main__":
    main()
