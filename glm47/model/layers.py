"""Primitives shared by the GLM-4.7 model: RMSNorm, partial NeoX RoPE and the SwiGLU MLP.

Numerics follow the reference implementation (the twins in glm47/ops/reference.py): RMSNorm normalises in
float32 and casts back before the weight multiply; RoPE angles are computed in float32 and cast to the
activation dtype. The weight-bearing linears are in linear.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm47.model.linear import MergedColumnLinear, RowLinear, WeightFormat
from glm47.ops import REFERENCE, Ops
from glm47.ops.reference import apply_rope  # noqa: F401 (the model's RoPE; tests import it from here)


class RMSNorm(nn.Module):
    """A replicated [dim] weight in the model's compute dtype; its checkpoint key is its own name."""
    ops: Ops = REFERENCE

    def __init__(self, dim: int, eps: float, fmt: WeightFormat | torch.dtype | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=WeightFormat.of(fmt).dtype))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.rms_norm(x, self)

    def add_and_norm(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """(x + h, self(x + h)): a pre-norm layer's residual add and the next norm, in one op."""
        return self.ops.add_rms_norm(x, h, self)


class RotaryEmbedding(nn.Module):
    """cos/sin for the first `rotary_dim` dims of each head (GLM rotates half of the 128: 64 dims)."""

    def __init__(self, rotary_dim: int, theta: float):
        super().__init__()
        self.rotary_dim, self.theta = rotary_dim, theta

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        # Frequencies are recomputed per call (rotary_dim / 2 values) in float32 rather than kept in a buffer.
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float32, device=positions.device) / self.rotary_dim
        inv_freq = 1.0 / (self.theta ** exponent)
        freqs = positions[..., None].float() * inv_freq  # (..., rotary_dim / 2)
        emb = torch.cat([freqs, freqs], dim=-1)  # NeoX layout: the two halves share a frequency
        return emb.cos().to(dtype), emb.sin().to(dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). gate and up are one fused matrix [2 * inter, hidden] (the checkpoint's
    gate_proj / up_proj are its blocks); down_proj is row-parallel, its all-reduce deferred with reduce=False (the
    MoE's shared expert, summed with the routed experts first)."""

    def __init__(self, hidden_size: int, intermediate_size: int, parallel=None, fmt=None, reduce: bool = True):
        super().__init__()
        self.gate_up_proj = MergedColumnLinear(hidden_size, [intermediate_size] * 2, parallel=parallel, fmt=fmt)
        self.down_proj = RowLinear(intermediate_size, hidden_size, parallel=parallel, fmt=fmt, reduce=reduce)
        self.intermediate_size = self.gate_up_proj.sizes[0]  # this rank's share

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)
