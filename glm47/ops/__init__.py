"""One dispatch for every op of the model: `Ops` is a table of implementations, chosen once per (device, weight
format) by `select` when a model is built or loaded, and held by the model's layers (`layer.ops.linear(x, layer)`).

    REFERENCE   the torch twins (ops/reference.py): any device, any dtype, autograd; what the tests hold the
                others to
    CPU_BF16    glm47.kernels on an AVX512-BF16 CPU for bf16 weights (ops/cpu.py), the twins where a kernel
                does not apply

`select` reads GLM47_KERNELS (0: the twins everywhere) and builds the CPU kernels (or loads them from torch's
extension cache) right then, so neither happens inside a forward. A GPU path or an 8-bit weight format is one
more row here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from glm47 import kernels
from glm47.ops import cpu, reference

log = logging.getLogger("glm47")


@dataclass(frozen=True, slots=True)
class Ops:
    name: str
    linear: Callable  # (x, layer) -> x @ layer.weight.T + layer.bias
    rms_norm: Callable  # (x, norm) -> RMSNorm(x)
    add_rms_norm: Callable  # (x, h, norm) -> (x + h, RMSNorm(x + h))
    qk_norm_rope: Callable  # (qkv, attention, cos, sin) -> q, k normed per head and rotated
    moe: Callable  # (x (N, H), moe) -> routed experts' weighted sum + shared expert
    decode_attention: Callable  # (q, k_cache, v_cache, block_tables, mask, length, lens): one query a sequence
    prefill_attention: Callable  # (q, k, v, k_cache, v_cache, block_table, context_len): one causal chunk


REFERENCE = Ops("torch", reference.linear, reference.rms_norm, reference.add_rms_norm, reference.qk_norm_rope,
                reference.moe, reference.decode_attention, reference.prefill_attention)
CPU_BF16 = Ops("cpu-avx512bf16", cpu.linear, cpu.rms_norm, cpu.add_rms_norm, cpu.qk_norm_rope, cpu.moe,
               cpu.decode_attention, cpu.prefill_attention)


def kernels_enabled() -> bool:
    """GLM47_KERNELS=0 keeps every op on its torch twin."""
    return os.environ.get("GLM47_KERNELS", "1") != "0"


def select(device: torch.device | str, dtype: torch.dtype) -> Ops:
    """The implementations for weights of `dtype` on `device`. On a CPU with bf16 weights this builds (or loads)
    the kernels; without AVX512-BF16, or if the build fails (one warning), the twins run."""
    device = torch.device(device)
    if device.type == "cpu" and dtype == torch.bfloat16 and kernels_enabled() and kernels.extension() is not None:
        return CPU_BF16
    return REFERENCE


def use(module: torch.nn.Module, ops: Ops) -> None:
    """Sets `ops` on `module` and every submodule that computes through the ops table (declares an `ops`)."""
    for m in module.modules():
        if isinstance(getattr(type(m), "ops", None), Ops):
            m.ops = ops
