"""One GLM-4.x decoder layer, pre-norm: x + attn(input_layernorm(x)), then x + mlp(post_attention_layernorm(x)).
Layers below `first_k_dense_replace` use a dense SwiGLU MLP, the rest (and the MTP layer) the MoE block."""

from __future__ import annotations

from torch import Tensor, nn

from glm47.config import ModelConfig
from glm47.model.attention import Attention
from glm47.model.layers import MLP, RMSNorm
from glm47.model.moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, parallel=None, fmt=None):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fmt)
        self.self_attn = Attention(config, layer_idx, parallel, fmt)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, fmt)
        self.mlp = (MoE(config, parallel, fmt) if config.is_moe_layer(layer_idx)
                    else MLP(config.hidden_size, config.intermediate_size, parallel, fmt))

    def forward(self, x: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor], cache) -> Tensor:
        x, h = self.post_attention_layernorm.add_and_norm(
            x, self.self_attn(self.input_layernorm(x), positions, rope, cache))
        return x + self.mlp(h)
