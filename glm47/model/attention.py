"""GQA self-attention of GLM-4.x: fused q/k/v projection with bias, per-head RMSNorm on q and k
(`use_qk_norm`) before partial RoPE, no bias on o_proj. Where K/V are kept is the cache's business.
Head counts are this rank's (see QKVLinear for how heads split over tensor-parallel ranks)."""

from __future__ import annotations

from torch import Tensor, nn

from glm47.config import ModelConfig
from glm47.model.layers import RMSNorm
from glm47.model.linear import QKVLinear, RowLinear
from glm47.ops import REFERENCE, Ops


class Attention(nn.Module):
    ops: Ops = REFERENCE

    def __init__(self, config: ModelConfig, layer_idx: int, parallel=None, fmt=None):
        super().__init__()
        self.layer_idx = layer_idx
        # One matrix [q; k; v] so that a step does one GEMM; q_proj/k_proj/v_proj load into its rows.
        self.qkv_proj = QKVLinear(config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
                                  config.head_dim, config.attention_bias, parallel, fmt)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.head_dim = config.head_dim
        self.split = list(self.qkv_proj.sizes)
        self.o_proj = RowLinear(config.num_attention_heads * config.head_dim, config.hidden_size, parallel=parallel,
                                fmt=fmt)
        if config.use_qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, fmt)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, fmt)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], cache) -> Tensor:
        B, T, _ = x.shape
        qkv = self.qkv_proj(x)
        v = qkv[..., self.split[0] + self.split[1]:].view(B, T, self.num_kv_heads, self.head_dim)  # (B, T, Hkv, D)
        q, k = self.ops.qk_norm_rope(qkv, self, *rope)  # (B, T, H, D), (B, T, Hkv, D)
        o = cache.attend(self.layer_idx, q, k, v, positions)  # (B, T, H, D)
        return self.o_proj(o.reshape(B, T, -1))
