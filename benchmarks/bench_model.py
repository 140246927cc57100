"""Model forward speed against transformers on the same weights (the `bench` preset: GLM-4.7's vocabulary
and head layout, 8 layers, 64 experts top-8), bf16 on CPU. Prints ratios measured in this run.

    python benchmarks/bench_model.py [--prefill 512] [--decode 32]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

import glm47
from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset
from glm47.model.kv_cache import KVCache


def timed(fn, repeat=3):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode", type=int, default=32)
    args = ap.parse_args()
    import transformers

    config = preset("bench")
    with tempfile.TemporaryDirectory() as d, torch.inference_mode():
        init_checkpoint(config, d, seed=0, mtp=False)
        ours = glm47.load_model(d, dtype=torch.bfloat16)
        ref = transformers.Glm4MoeForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
        ids = torch.randint(0, config.vocab_size, (1, args.prefill))
        t_ours = timed(lambda: ours.compute_logits(ours(ids)))
        t_ref = timed(lambda: ref(ids).logits)
        print(f"prefill {args.prefill} tokens: glm47 {args.prefill / t_ours:8.1f} tok/s   "
              f"transformers {args.prefill / t_ref:8.1f} tok/s   ratio {t_ref / t_ours:.2f}x")

        def decode_ours():
            cache = KVCache.for_model(config, 1, 64 + args.decode, dtype=torch.bfloat16)
            ours.compute_logits(ours(ids[:, :64], torch.arange(64)[None], cache))
            tok = ids[:, :1]
            for t in range(64, 64 + args.decode):
                tok = ours.compute_logits(ours(tok, torch.tensor([[t]]), cache))[:, -1:].argmax(-1)

        def decode_ref():
            ref.generate(ids[:, :64], max_new_tokens=args.decode, min_new_tokens=args.decode, do_sample=False)

        t_ours, t_ref = timed(decode_ours, 1), timed(decode_ref, 1)
        print(f"decode {args.decode} tokens (batch 1): glm47 {args.decode / t_ours:6.1f} tok/s   "
              f"transformers {args.decode / t_ref:6.1f} tok/s   ratio {t_ref / t_ours:.2f}x")


if __name__ == "__main__":
    main()
