"""Hand-written CPU kernels for decode steps of a bf16 model (cpu_bf16.cpp): a skinny linear that streams the
weight once for a few rows, and the routed experts of a MoE layer in one call. Compiled with
torch.utils.cpp_extension on first use and cached in torch's extension directory.

They only replace torch code, never add behaviour: `fits` says when they apply (CPU, bf16, AVX512-BF16, few
rows, no autograd, GLM47_KERNELS not 0, the build worked), and otherwise the torch path runs. That torch path
is their reference: tests/test_kernels.py holds the two equal.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

# Most rows (tokens) each kernel takes; above them torch's GEMM (oneDNN) is as fast or faster. Measured on a
# 2-core AVX512-BF16 EPYC with the `bench` model's shapes (see benchmarks/bench_kernels.py).
LINEAR_MAX_ROWS = 16
EXPERTS_MAX_TOKENS = 16


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
    try:
        from torch.utils.cpp_extension import load

        flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16",
                 "-ffp-contract=off", "-fopenmp"]  # no implicit FMA: the rounding must match the torch path
        module = load(name="glm47_cpu_bf16", sources=[str(Path(__file__).with_name("cpu_bf16.cpp"))],
                      extra_cflags=flags, extra_ldflags=["-fopenmp"])
    except Exception as e:  # no compiler, no ninja, a build error: the torch path still works
        log.warning("glm47.kernels: could not build the CPU kernels, using torch instead (%s: %s)",
                    type(e).__name__, str(e).strip().splitlines()[-1] if str(e).strip() else "")
        return None
    return module if module.cpu_supported() else None


def enabled() -> bool:
    """GLM47_KERNELS=0 turns the kernels off (read on every call, so tests and benchmarks can flip it)."""
    return os.environ.get("GLM47_KERNELS", "1") != "0"


def fits(x: Tensor, weight: Tensor, max_rows: int) -> bool:
    """Whether the kernels take this call: CPU bf16 activations and weights, at most `max_rows` rows of x,
    nothing that autograd must see, and the kernels enabled and built."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and x.numel() <= max_rows * x.shape[-1]
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and enabled() and extension() is not None)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, float_out: bool = False) -> Tensor:
    """x (..., K) @ weight (N, K).T + bias -> (..., N), bf16 (float32 with float_out). The caller checks `fits`."""
    y = extension().linear(x.reshape(-1, x.shape[-1]), weight.contiguous(), bias, float_out)
    return y.view(*x.shape[:-1], weight.shape[0])


def routed_experts(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
    """x (N, H) bf16, stacked experts w13 (E, 2I, H) and w2 (E, H, I), routing weights (N, K) float32 and
    expert ids (N, K) -> sum_k weights[:, k] * expert_{ids[:, k]}(x), (N, H) bf16. The caller checks `fits`."""
    return extension().routed_experts(x.contiguous(), w13, w2, weights, ids)
