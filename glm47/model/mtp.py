"""The multi-token-prediction (MTP) layer of GLM-4.5/4.6/4.7, stored in checkpoints as layer
`num_hidden_layers`. From the main model's final-normed hidden state at position i and the token at
i+1 it predicts the token at i+2: eh_proj(cat[enorm(embed(t_{i+1})), hnorm(h_i)]) -> one MoE decoder
layer -> shared_head.norm -> LM head. Drafting with it is the engine's business, not this file's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glm47.config import ModelConfig
from glm47.model.decoder import DecoderLayer
from glm47.model.layers import RMSNorm
from glm47.model.linear import LMHead, ReplicatedLinear, VocabEmbedding


class SharedHead(nn.Module):
    def __init__(self, config: ModelConfig, own_head: bool, parallel=None, fmt=None):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fmt)
        # GLM-4.5 ships its own copy of the LM head here; GLM-4.6/4.7 may not, then the main head is used.
        self.head = LMHead(config.hidden_size, config.vocab_size, parallel, fmt) if own_head else None


class MTPLayer(DecoderLayer):
    """A decoder layer (same parameter names as the checkpoint's block) plus the MTP input/output parts."""

    def __init__(self, config: ModelConfig, layer_idx: int, own_embed: bool = False, own_head: bool = False,
                 parallel=None, fmt=None):
        super().__init__(config, layer_idx, parallel, fmt)
        h = config.hidden_size
        self.enorm = RMSNorm(h, config.rms_norm_eps, fmt)
        self.hnorm = RMSNorm(h, config.rms_norm_eps, fmt)
        self.eh_proj = ReplicatedLinear(2 * h, h, fmt=fmt)
        self.shared_head = SharedHead(config, own_head, parallel, fmt)
        self.embed_tokens = VocabEmbedding(config.vocab_size, h, parallel, fmt) if own_embed else None

    def forward_mtp(self, hidden: Tensor, next_ids: Tensor, positions: Tensor, rope: tuple[Tensor, Tensor],
                    cache, embed: VocabEmbedding) -> Tensor:
        """hidden: (B, T, H) main-model hidden at positions i; next_ids: (B, T) tokens at i+1.
        Returns the layer output *before* shared_head.norm, (B, T, H)."""
        e = self.enorm((self.embed_tokens or embed)(next_ids))
        x = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))  # order: [embedding, hidden]
        return super().forward(x, positions, rope, cache)
