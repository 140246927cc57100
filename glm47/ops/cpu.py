"""The ops on a CPU with AVX512-BF16, for bf16 weights: glm47.kernels where they are faster, the torch twin
(ops/reference.py) where they are not or cannot run.

Per call, only the shape and autograd decide: a kernel takes at most its row limit (measured, see
glm47.kernels) and never a tensor that autograd must see (training runs the twins). Which implementation a model
uses at all is decided once, by ops.select, when the model is built or loaded.
"""

from __future__ import annotations

import torch
from torch import Tensor

from glm47 import kernels
from glm47.ops import reference


def takes(x: Tensor, weight: Tensor, max_rows: int | None = None) -> bool:
    """bf16 activations and weights (or cache) on the CPU, at most `max_rows` rows of x, nothing autograd sees."""
    return (x.device.type == "cpu" and x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16
            and (max_rows is None or x.numel() <= max_rows * x.shape[-1])
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def linear(x: Tensor, layer) -> Tensor:
    if takes(x, layer.weight, kernels.LINEAR_MAX_ROWS):
        return kernels.linear(x, layer.weight, layer.bias)
    return reference.linear(x, layer)


def rms_norm(x: Tensor, layer) -> Tensor:
    if takes(x, layer.weight):
        return kernels.rms_norm(x, layer.weight, layer.eps)
    return reference.rms_norm(x, layer)


def add_rms_norm(x: Tensor, h: Tensor, layer) -> tuple[Tensor, Tensor]:
    if takes(x, layer.weight) and h.dtype == x.dtype and h.shape == x.shape:
        return kernels.rms_norm(x, layer.weight, layer.eps, add=h)
    return reference.add_rms_norm(x, h, layer)


def qk_norm_rope(qkv: Tensor, attn, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    if takes(qkv, cos):
        norm = attn.q_norm is not None
        return kernels.qk_norm_rope(qkv, attn.num_heads, attn.num_kv_heads, attn.head_dim,
                                    attn.q_norm.weight if norm else None, attn.k_norm.weight if norm else None,
                                    attn.q_norm.eps if norm else 0.0, cos, sin)
    return reference.qk_norm_rope(qkv, attn, cos, sin)


def moe(x: Tensor, moe) -> Tensor:
    """The router (for a decode step's few tokens) and then the routed and shared experts in one call each."""
    gate, experts, shared = moe.gate, moe.experts, moe.shared_experts
    if not takes(x, experts.w13, kernels.EXPERTS_MAX_TOKENS):
        return reference.moe(x, moe)
    if takes(x, experts.w13, kernels.ROUTE_MAX_TOKENS):
        weights, ids = kernels.route(x, gate.weight, gate.e_score_correction_bias, gate.top_k, gate.n_group,
                                     gate.topk_group, gate.norm_topk_prob, gate.scale)
    else:
        weights, ids = reference.route(x, gate)
    shared_w13 = shared.gate_up_proj.weight if shared is not None else None
    shared_w2 = shared.down_proj.weight if shared is not None else None
    return kernels.routed_experts(x, experts.w13, experts.w2, weights, ids, shared_w13, shared_w2,
                                  experts.local_first)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, mask: Tensor | None,
                     length: int, lens: Tensor) -> Tensor:
    """Reads the blocks in place instead of gathering them for SDPA (head dim a multiple of 32)."""
    if takes(q, k_cache) and q.shape[-1] % 32 == 0:
        return kernels.decode_attention(q, k_cache, v_cache, block_tables, lens)
    return reference.decode_attention(q, k_cache, v_cache, block_tables, mask, length, lens)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                      context_len: int) -> Tensor:
    """Flash attention over the blocks in place (head dim a multiple of 32)."""
    if takes(q, k_cache) and q.shape[-1] % 32 == 0:
        return kernels.prefill_attention(q, k_cache, v_cache, block_table, context_len)
    return reference.prefill_attention(q, k, v, k_cache, v_cache, block_table, context_len)
