"""glm47.kernels against the torch code they replace, in one process: GB/s of weights read per second for the
`bench` model's linear shapes and for its routed experts, at several token counts, next to torch.sum's read
bandwidth. Weights are cycled through enough copies (>= 256 MB) that they come from memory, not the caches.

    python benchmarks/bench_kernels.py [--rows 1,2,4,8,16,32,64] [--repeat 5]
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import torch
import torch.nn.functional as F

from glm47 import kernels
from glm47.bench import measure_bandwidth
from glm47.config import preset
from glm47.model.moe import Experts, select_experts

COPY_BYTES = 256 << 20


def best_time(fn, calls: list[tuple], repeat: int) -> float:
    """Seconds per call of fn(*args) over the argument tuples in `calls`: the best of `repeat` passes."""
    fn(*calls[0])
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for args in calls:
            fn(*args)
        best = min(best, (time.perf_counter() - t) / len(calls))
    return best


def copies(make, nbytes: int) -> list:
    return [make() for _ in range(max(1, -(-COPY_BYTES // nbytes)))]


def torch_experts(layer: Experts, x, weights, ids):
    return layer(x, weights, ids)


def bench_linear(rows: list[int], repeat: int) -> None:
    c = preset("bench")
    H, D = c.hidden_size, c.head_dim
    shapes = {"lm_head": (c.vocab_size, H), "qkv_proj": ((c.num_attention_heads + 2 * c.num_key_value_heads) * D, H),
              "o_proj": (H, c.num_attention_heads * D), "dense gate_up": (2 * c.intermediate_size, H),
              "dense down": (H, c.intermediate_size), "shared down": (H, c.moe_intermediate_size)}
    print(f"{'linear (N, K)':28s}{'rows':>5s}{'kernel':>9s}{'torch':>9s}{'no-dnn':>9s}  GB/s of weights")
    for name, (N, K) in shapes.items():
        ws = copies(functools.partial(torch.randn, N, K, dtype=torch.bfloat16), N * K * 2)
        for M in rows:
            x = torch.randn(M, K).bfloat16()
            calls = [(x, w) for w in ws]
            k = best_time(kernels.linear, calls, repeat)
            t = best_time(F.linear, calls, repeat)
            torch.backends.mkldnn.enabled = False
            t0 = best_time(F.linear, calls, repeat)
            torch.backends.mkldnn.enabled = True
            gb = N * K * 2 / 1e9
            print(f"{name + f' {(N, K)}':28s}{M:5d}{gb / k:9.1f}{gb / t:9.1f}{gb / t0:9.1f}")


def bench_experts(tokens: list[int], repeat: int) -> None:
    c = preset("bench")
    E, H, I, K = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
    layers = copies(functools.partial(Experts, E, H, I), E * 3 * H * I * 2)
    for ex in layers:
        ex.bfloat16().requires_grad_(False)
        torch.nn.init.normal_(ex.w13, std=0.02)
        torch.nn.init.normal_(ex.w2, std=0.02)
    print(f"\n{'routed experts (E, H, I, K)':28s}{'tokens':>6s}{'experts':>8s}{'kernel':>9s}{'torch':>9s}  GB/s of "
          f"active expert weights (ms per layer)")
    for T in tokens:
        x = torch.randn(T, H).bfloat16()
        weights, ids = select_experts(torch.randn(T, E), torch.zeros(E), K, 1, 1, True, 1.0)
        active = ids.unique().numel()
        k = best_time(kernels.routed_experts, [(x, ex.w13, ex.w2, weights, ids) for ex in layers], repeat)
        os.environ["GLM47_KERNELS"] = "0"
        torch.backends.mkldnn.enabled = T > 2  # as model_runner runs it
        t = best_time(torch_experts, [(ex, x, weights, ids) for ex in layers], repeat)
        torch.backends.mkldnn.enabled = True
        os.environ.pop("GLM47_KERNELS")
        gb = active * 3 * H * I * 2 / 1e9
        print(f"{(E, H, I, K)!s:28s}{T:6d}{active:8d}{gb / k:9.1f}{gb / t:9.1f}  ({k * 1e3:.2f} vs {t * 1e3:.2f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", choices=["linear", "experts"])
    args = ap.parse_args()
    if kernels.extension() is None:
        raise SystemExit("glm47.kernels are not available on this machine (see the warning above)")
    print(f"{torch.get_num_threads()} threads; torch.sum reads {measure_bandwidth() / 1e9:.1f} GB/s")
    with torch.inference_mode():
        if args.only != "experts":
            bench_linear([int(r) for r in args.rows.split(",")], args.repeat)
        if args.only != "linear":
            bench_experts([int(t) for t in args.tokens.split(",")], args.repeat)
    print(f"torch.sum reads {measure_bandwidth() / 1e9:.1f} GB/s (again, after)")


if __name__ == "__main__":
    main()
