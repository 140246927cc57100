"""GQA self-attention of GLM-4.x: fused q/k/v projection with bias, per-head RMSNorm on q and k
(`use_qk_norm`) before partial RoPE, no bias on o_proj. Where K/V are kept is the cache's business."""

from __future__ import annotations

from torch import Tensor, nn

from glm47 import kernels
from glm47.config import ModelConfig
from glm47.model.layers import Linear, RMSNorm, apply_rope


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.split = [q_size, kv_size, kv_size]
        # One matrix [q; k; v] so that a step does one GEMM; q_proj/k_proj/v_proj load into its rows.
        self.qkv_proj = Linear(config.hidden_size, sum(self.split), bias=config.attention_bias)
        self.o_proj = Linear(q_size, config.hidden_size, bias=False)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], cache) -> Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split(self.split, dim=-1)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        cos, sin = rope
        if kernels.fits(qkv, cos):  # bf16 on an AVX512-BF16 CPU: one call for what follows (its twin)
            norm = self.q_norm is not None
            q, k = kernels.qk_norm_rope(qkv, self.num_heads, self.num_kv_heads, self.head_dim,
                                        self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                                        self.q_norm.eps if norm else 0.0, cos, sin)
        else:
            q = q.view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
            k = k.view(B, T, self.num_kv_heads, self.head_dim)
            if self.q_norm is not None:  # before RoPE, over the whole head
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = cache.attend(self.layer_idx, q, k, v, positions)  # (B, T, H, D)
        return self.o_proj(o.reshape(B, T, -1))
