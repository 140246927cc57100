"""glm47.kernels against the torch code they replace, in one process: GB/s of weights read per second for the
`bench` model's linear shapes and for its routed experts, at several token counts, next to torch.sum's read
bandwidth; decode attention (GB/s of K/V) and prefill attention (GFLOPS). Weights are cycled through enough
copies (>= 256 MB) that they come from memory, not the caches.

    python benchmarks/bench_kernels.py [--rows 1,2,4,8,16,32,64] [--repeat 5] [--only linear|experts|attention]
"""

from __future__ import annotations

import argparse
import functools
import time

import torch
import torch.nn.functional as F

from glm47 import kernels
from glm47.bench import measure_bandwidth
from glm47.config import preset
from glm47.model.linear import FusedExperts
from glm47.ops import CPU_BF16, reference
from glm47.ops.reference import routed_experts, select_experts

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
    layers = copies(functools.partial(FusedExperts, E, H, I, fmt=torch.bfloat16), E * 3 * H * I * 2)
    for ex in layers:
        ex.requires_grad_(False)
        torch.nn.init.normal_(ex.w13, std=0.02)
        torch.nn.init.normal_(ex.w2, std=0.02)
    print(f"\n{'routed experts (E, H, I, K)':28s}{'tokens':>6s}{'experts':>8s}{'kernel':>9s}{'torch':>9s}  GB/s of "
          f"active expert weights (ms per layer)")
    for T in tokens:
        x = torch.randn(T, H).bfloat16()
        weights, ids = select_experts(torch.randn(T, E), torch.zeros(E), K, 1, 1, True, 1.0)
        active = ids.unique().numel()
        k = best_time(kernels.routed_experts, [(x, ex.w13, ex.w2, weights, ids) for ex in layers], repeat)
        torch.backends.mkldnn.enabled = T > 2  # as model_runner runs it
        t = best_time(routed_experts, [(x, ex.w13, ex.w2, weights, ids) for ex in layers], repeat)
        torch.backends.mkldnn.enabled = True
        gb = active * 3 * H * I * 2 / 1e9
        print(f"{(E, H, I, K)!s:28s}{T:6d}{active:8d}{gb / k:9.1f}{gb / t:9.1f}  ({k * 1e3:.2f} vs {t * 1e3:.2f})")


def bench_attention(repeat: int) -> None:
    """The `bench` model's attention (16 heads, 2 KV heads of 128, blocks of 16): decode over the paged cache
    (GB/s of K and V read) and a prefill chunk with no context (GFLOPS), kernel against the torch twin."""
    H, Hkv, D, bs = 16, 2, 128, 16
    print(f"\n{'decode attention (B, keys)':28s}{'kernel':>9s}{'torch':>9s}  GB/s of K and V (ms)")
    for B, S in [(1, 2048), (16, 2048), (1, 32768)]:
        nb = B * S // bs
        k_cache, v_cache = torch.randn(nb, bs, Hkv, D).bfloat16(), torch.randn(nb, bs, Hkv, D).bfloat16()
        tables = torch.arange(nb).view(B, S // bs)
        lens = torch.full((B,), S)
        q = torch.randn(B, H, D).bfloat16()
        mask = None if B == 1 else torch.ones(B, 1, 1, S, dtype=torch.bool)
        k = best_time(kernels.decode_attention, [(q, k_cache, v_cache, tables, lens)], repeat)
        t = best_time(reference.decode_attention, [(q, k_cache, v_cache, tables, mask, S, lens)], repeat)
        gb = B * S * Hkv * D * 2 * 2 / 1e9
        print(f"{(B, S)!s:28s}{gb / k:9.1f}{gb / t:9.1f}  ({k * 1e3:.2f} vs {t * 1e3:.2f})")
    print(f"\n{'prefill attention (tokens)':28s}{'kernel':>9s}{'torch':>9s}  GFLOPS, causal (ms)")
    for n in (512, 2048):
        k_cache, v_cache = torch.randn(n // bs, bs, Hkv, D).bfloat16(), torch.randn(n // bs, bs, Hkv, D).bfloat16()
        q = torch.randn(n, H, D).bfloat16()
        args = (q, k_cache.flatten(0, 1), v_cache.flatten(0, 1), k_cache, v_cache, torch.arange(n // bs), 0)
        k = best_time(CPU_BF16.prefill_attention, [args], repeat)
        t = best_time(reference.prefill_attention, [args], repeat)
        flops = 4 * n * n / 2 * D * H / 1e9
        print(f"{n:<28d}{flops / k:9.0f}{flops / t:9.0f}  ({k * 1e3:.1f} vs {t * 1e3:.1f})")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,2,4,8,16,32,64")
    ap.add_argument("--tokens", default="1,2,4,8,16,32,64,128")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", choices=["linear", "experts", "attention"])
    args = ap.parse_args()
    if kernels.extension() is None:
        raise SystemExit("glm47.kernels are not available on this machine (see the warning above)")
    print(f"{torch.get_num_threads()} threads; torch.sum reads {measure_bandwidth() / 1e9:.1f} GB/s")
    with torch.inference_mode():
        if args.only in (None, "linear"):
            bench_linear([int(r) for r in args.rows.split(",")], args.repeat)
        if args.only in (None, "experts"):
            bench_experts([int(t) for t in args.tokens.split(",")], args.repeat)
        if args.only in (None, "attention"):
            bench_attention(args.repeat)
    print(f"torch.sum reads {measure_bandwidth() / 1e9:.1f} GB/s (again, after)")


if __name__ == "__main__":
    main()
