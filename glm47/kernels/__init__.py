"""Hand-written CPU kernels for a bf16 model (cpu/, one C++ file per op; cpu/ops.h lists them): a skinny linear
that streams the weight once for a few rows, the MoE router, the routed and shared experts of a MoE layer in one
call (decode steps and prefill chunks), q/k RMSNorm + RoPE, RMSNorm, one-query attention over the paged KV cache,
and flash attention over it for prefill chunks. Compiled with torch.utils.cpp_extension on first use, cached in
torch's extension directory.

They only replace torch code, never add behaviour. glm47.ops decides when they run (ops.select once per model:
CPU, bf16, AVX512-BF16, GLM47_KERNELS not 0, the build worked; ops/cpu.py per call: few enough rows, no
autograd); otherwise the torch twins in glm47/ops/reference.py run, which round at the same points:
tests/ops/test_kernels.py holds the two equal."""

from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

from torch import Tensor

log = logging.getLogger(__name__)

# Most rows (tokens) each kernel takes. Measured on a 2-core AVX512-BF16 EPYC (no AMX) with the `bench` model's
# shapes (benchmarks/bench_kernels.py): the linear beats oneDNN 1.1-2.2x up to 16 rows and ~1.3x at 32 (but
# 0.93x for K=3072), ties at 64 and loses from 128 on (oneDNN's packed GEMM is better once compute-bound); the
# routed experts beat the grouped torch path at every size tried, 1 to 2,048 tokens (3-4x below 512, 2.5x at
# 2,048 with the packed prefill path), so they take prefill chunks too.
LINEAR_MAX_ROWS = 32
EXPERTS_MAX_TOKENS = 4096
# The router's float32 GEMV re-reads its (E, H) weight per token: fine for a decode step, not for a prefill chunk,
# where torch's GEMM is faster.
ROUTE_MAX_TOKENS = 64


def cpu_has_avx512_bf16() -> bool:
    """The CPU flags say AVX512-BF16 (and AVX512BW, for the masked bf16 loads). Linux only: elsewhere False."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx512_bf16", "avx512bw", "avx512f"} <= flags
    except OSError:
        pass
    return False


@functools.cache
def extension():
    """The compiled module, or None on a CPU without AVX512-BF16 or when it cannot be built (one warning)."""
    if not cpu_has_avx512_bf16():
        return None
    log.info("glm47.kernels: loading the CPU kernels (built on first use, ~1 min, then cached)")
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                 "-ffp-contract=off", "-fopenmp"]  # no implicit FMA: the rounding must match the torch path
        files = sorted((Path(__file__).parent / "cpu").glob("*.[ch]*"))
        # torch rebuilds when a source's text or a flag changes, and does not look at headers: their hash goes
        # into the flags, so that a changed header cannot leave a stale build in the cache.
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in files)).hexdigest()[:16]
        module = load(name="glm47_cpu_bf16", sources=[str(f) for f in files if f.suffix == ".cpp"],
                      extra_cflags=flags + [f"-DGLM47_SOURCES={digest}"], extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, a build error: the torch path still works
        log.warning("glm47.kernels: could not build the CPU kernels, using torch instead (%s: %s)",
                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None
    return module if module.cpu_supported() else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, float_out: bool = False) -> Tensor:
    """x (..., K) @ weight (N, K).T + bias -> (..., N), bf16 (float32 with float_out). glm47.ops decides when it applies."""
    y = extension().linear(x.reshape(-1, x.shape[-1]), weight.contiguous(), bias, float_out)
    return y.view(*x.shape[:-1], weight.shape[0])


def routed_experts(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor, shared_w13: Tensor | None = None,
                   shared_w2: Tensor | None = None, first: int | None = None) -> Tensor:
    """x (N, H) bf16, stacked experts w13 (E, 2I, H) and w2 (E, H, I), routing weights (N, K) float32 and
    expert ids (N, K) -> sum_k weights[:, k] * expert_{ids[:, k]}(x), (N, H) bf16; with a shared expert's
    gate_up (2Is, H) and down (H, Is) weights, plus its output (added in bf16). With `first` (expert parallelism)
    the stacks hold experts first .. first + E - 1 and the sum is over the copies routed to them.
    glm47.ops decides when it applies."""
    return extension().routed_experts(x.contiguous(), w13, w2, weights, ids, shared_w13, shared_w2,
                                      -1 if first is None else first)


def route(x: Tensor, weight: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
          scale: float) -> tuple[Tensor, Tensor]:
    """The sigmoid router: x (N, H) bf16, weight (E, H) float32, bias (E,) float32 -> weights (N, top_k) float32,
    ids (N, top_k) int64, as glm47.model.moe.select_experts(F.linear(x.float(), weight), bias, ...) gives them."""
    weights, ids = extension().route(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scale)
    return weights, ids


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lens: Tensor) -> Tensor:
    """q (B, H, D) bf16, one query per sequence; caches (num_blocks, block_size, Hkv, D); block_tables (B, W);
    lens (B,) keys each query sees -> (B, H, D), softmax(q k^T / sqrt(D)) v per head. D a multiple of 32."""
    return extension().decode_attention(q.contiguous(), k_cache, v_cache, block_tables, lens, q.shape[-1] ** -0.5)


def prefill_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, context_len: int) -> Tensor:
    """q (n, H, D) bf16: the queries of one sequence's chunk at positions context_len .. context_len + n - 1, whose
    K/V are already in the cache; block_table (nb,) covers its context_len + n keys -> (n, H, D), causal
    softmax(q k^T / sqrt(D)) v per head (GQA). D a multiple of 32."""
    return extension().prefill_attention(q.contiguous(), k_cache, v_cache, block_table, context_len,
                                         q.shape[-1] ** -0.5)


def qk_norm_rope(qkv: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, q_norm: Tensor | None,
                 k_norm: Tensor | None, eps: float, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """qkv (..., >= (H + 2 Hkv) D) bf16, the fused projection's output; cos/sin (..., rot) -> q (..., H, D),
    k (..., Hkv, D): per-head RMSNorm with the q_norm / k_norm weights (both None: no norm), then RoPE on the
    first rot dims (rotate-half), rounded as glm47.model.layers rounds them."""
    lead = qkv.shape[:-1]
    q, k = extension().qk_norm_rope(qkv.reshape(-1, qkv.shape[-1]), num_heads, num_kv_heads, head_dim, q_norm,
                                    k_norm, eps, cos.reshape(-1, cos.shape[-1]).contiguous(),
                                    sin.reshape(-1, sin.shape[-1]).contiguous())
    return q.view(*lead, num_heads, head_dim), k.view(*lead, num_kv_heads, head_dim)


def rms_norm(x: Tensor, weight: Tensor, eps: float, add: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """RMSNorm of x (..., D) bf16 with the bf16 weight, rounded as glm47.model.layers.RMSNorm rounds it. With `add`
    (x's shape), returns (x + add, RMSNorm(x + add)): the residual stream and its norm in one pass."""
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    total, out = extension().rms_norm(flat, None if add is None else add.reshape(flat.shape).contiguous(), weight,
                                      eps)
    return out.view(x.shape) if add is None else (total.view(x.shape), out.view(x.shape))
