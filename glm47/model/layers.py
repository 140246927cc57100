"""Primitives shared by the GLM-4.7 model: Linear, RMSNorm, partial NeoX RoPE and the SwiGLU MLP.

Numerics follow the reference implementation: RMSNorm normalises in float32 and casts back before the
weight multiply; RoPE angles are computed in float32 and cast to the activation dtype. Every linear layer
goes through `linear`, the one place where a decode step's few bf16 rows on CPU take glm47.kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm47 import kernels


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias). A few bf16 rows on an AVX512-BF16 CPU (a decode step) go through the skinny
    kernel instead, which reads the weight at memory speed where torch's GEMV does not; F.linear is its twin."""
    if kernels.fits(x, weight, kernels.LINEAR_MAX_ROWS):
        return kernels.linear(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters and checkpoint keys) whose forward is `linear`."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if kernels.fits(x, self.weight):  # bf16 on an AVX512-BF16 CPU: one call for the code below (its twin)
            return kernels.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)

    def add_and_norm(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """(x + h, self(x + h)): a pre-norm layer's residual add and the next norm, in one kernel call on CPU bf16."""
        if kernels.fits(x, self.weight) and h.dtype == x.dtype and h.shape == x.shape:
            return kernels.rms_norm(x, self.weight, self.eps, add=h)
        x = x + h
        return x, self(x)


class RotaryEmbedding(nn.Module):
    """cos/sin for the first `rotary_dim` dims of each head (GLM rotates half of the 128: 64 dims)."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim, self.theta = rotary_dim, theta

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Frequencies are recomputed per call (rotary_dim / 2 values) rather than kept in a buffer, so that
        # model.to(bfloat16) can never round them.
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=positions.device) / self.rotary_dim
        inv_freq = 1.0 / (self.theta ** exponent)
        freqs = positions[..., None].float() * inv_freq  # (..., rotary_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)  # NeoX layout: the two halves share a frequency
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, heads, head_dim); cos/sin: (B, T, rotary_dim). Rotates x[..., :rotary_dim] NeoX style
    (rotate-half), the remaining dims pass through unchanged."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). gate and up are one fused matrix [2 * inter, hidden]; the
    checkpoint's gate_proj / up_proj load into its halves (see checkpoint/spec.py)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
