"""GLM-4.5/4.6/4.7 (`Glm4MoeForCausalLM`): embedding, decoder layers, final norm, untied LM head, and the
optional MTP layer(s). Module names are the checkpoint's keys, except the fused/stacked parameters and the
MTP layer, which checkpoint/spec.py maps in one table.

    logits = model(input_ids)                                   # (B, T) -> (B, T, V), no cache
    logits, hidden = model(ids, positions, cache, return_hidden=True)
    draft_logits = model.mtp_logits(hidden, next_ids, positions, cache)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glm47.config import ModelConfig
from glm47.model.decoder import DecoderLayer
from glm47.model.kv_cache import NoCache
from glm47.model.layers import Linear, RMSNorm, RotaryEmbedding
from glm47.model.mtp import MTPLayer


class Glm4MoeModel(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta)

    def forward(self, input_ids: Tensor, positions: Tensor, cache) -> Tensor:
        """(B, T) ids and positions -> final-normed hidden states (B, T, H)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, positions, rope, cache)
        return self.norm(x)


class Glm4MoeForCausalLM(nn.Module):
    def __init__(self, config: ModelConfig, mtp: bool | None = None, mtp_own_embed: bool = False,
                 mtp_own_head: bool = False):
        """mtp: build the MTP layer(s) (default: when the config has num_nextn_predict_layers > 0)."""
        super().__init__()
        self.config = config
        self.model = Glm4MoeModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        n_mtp = config.num_nextn_predict_layers if mtp in (None, True) else 0
        N = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, N + j, mtp_own_embed, mtp_own_head) for j in range(n_mtp))

    @property
    def has_mtp(self) -> bool:
        return len(self.mtp) > 0

    def forward(self, input_ids: Tensor, positions: Tensor | None = None, cache=None,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        if positions is None:
            B, T = input_ids.shape
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        hidden = self.model(input_ids, positions, cache or NoCache())
        logits = self.lm_head(hidden)
        return (logits, hidden) if return_hidden else logits

    def mtp_forward(self, hidden: Tensor, next_ids: Tensor, positions: Tensor | None = None, cache=None,
                    depth: int = 0) -> tuple[Tensor, Tensor]:
        """Draft logits for position i+2 from the main model's final-normed hidden at i (B, T, H) and the
        tokens at i+1 (B, T). `positions` are those of the hidden states (i). Returns (logits (B, T, V),
        the MTP layer's output before shared_head.norm (B, T, H), which is what a further draft step takes)."""
        out = self.mtp_hidden(hidden, next_ids, positions, cache, depth)
        return self.mtp_head(out, depth), out

    def mtp_hidden(self, hidden: Tensor, next_ids: Tensor, positions: Tensor | None = None, cache=None,
                   depth: int = 0) -> Tensor:
        """The MTP layer alone: its output before shared_head.norm (B, T, H); mtp_head turns rows of it into
        logits (an engine asks for a few rows only)."""
        if not self.has_mtp:
            raise ValueError("this model has no MTP layer (the checkpoint had no MTP weights)")
        if positions is None:
            B, T = next_ids.shape
            positions = torch.arange(T, device=next_ids.device).expand(B, T)
        rope = self.model.rotary_emb(positions, hidden.dtype)
        return self.mtp[depth].forward_mtp(hidden, next_ids, positions, rope, cache or NoCache(),
                                           self.model.embed_tokens)

    def mtp_head(self, out: Tensor, depth: int = 0) -> Tensor:
        shared = self.mtp[depth].shared_head
        return (shared.head or self.lm_head)(shared.norm(out))

    def mtp_logits(self, hidden: Tensor, next_ids: Tensor, positions: Tensor | None = None, cache=None) -> Tensor:
        return self.mtp_forward(hidden, next_ids, positions, cache)[0]
