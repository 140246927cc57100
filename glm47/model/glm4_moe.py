"""GLM-4.5/4.6/4.7 (`Glm4MoeForCausalLM`): embedding, decoder layers, final norm, untied LM head, and the
optional MTP layer(s). Module names are the checkpoint's keys, except the fused parameters (the packed_modules
table), the stacked experts (FusedExperts names their keys) and the MTP layer's prefix (official_name); the
layers (model/linear.py) give the loader and the writer every key with its shape: checkpoint_entries().

    hidden = model(input_ids, positions, cache)    # (B, T) -> final-normed (B, T, H); no cache: NoCache
    logits = model.compute_logits(hidden)          # (B, T, V); pass only the rows you need
    out = model.mtp_forward(hidden, next_ids, positions, cache)  # MTP layer 0 on h_i, t_{i+1}: (B, T, H)
    draft_logits = model.compute_logits(out, mtp_layer=0)        # logits of t_{i+2}

One path per job: the engine, training and evaluation all call these. A cache (kv_cache.AttentionCache) holds
K/V for num_kv_layers layers: the decoder layers, then the MTP layers. mtp_forward returns the layer's output
before its shared_head.norm, not logits, because a chained draft feeds that output back in as the next hidden
state and an engine wants logits for a few rows only; compute_logits is the one way to logits, main or MTP.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glm47.config import ModelConfig
from glm47.model.decoder import DecoderLayer
from glm47.model.kv_cache import AttentionCache, NoCache
from glm47.model.layers import RMSNorm, RotaryEmbedding
from glm47.model.linear import Entry, LMHead, VocabEmbedding, WeightFormat, checkpoint_entries
from glm47.model.mtp import MTPLayer
from glm47.model.parallel import SINGLE, ParallelState, check_tp
from glm47.ops import Ops, select, use


class Glm4MoeModel(nn.Module):
    def __init__(self, config: ModelConfig, parallel=None, fmt=None):
        super().__init__()
        self.config = config
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, parallel, fmt)
        self.layers = nn.ModuleList(DecoderLayer(config, i, parallel, fmt) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, fmt)
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.rope_theta)

    def forward(self, input_ids: Tensor, positions: Tensor, cache) -> Tensor:
        """(B, T) ids and positions -> final-normed hidden states (B, T, H)."""
        x = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, positions, rope, cache)
        return self.norm(x)


class Glm4MoeForCausalLM(nn.Module):
    # Our fused modules -> the official modules that are their row blocks, in order. Every other parameter has
    # its checkpoint name (the routed experts name theirs: FusedExperts), except the MTP layer's prefix.
    packed_modules = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, config: ModelConfig, mtp: bool | None = None, mtp_own_embed: bool = False,
                 mtp_own_head: bool = False, parallel: ParallelState | None = None,
                 fmt: WeightFormat | torch.dtype | None = None):
        """mtp: build the MTP layer(s) (default: when the config has num_nextn_predict_layers > 0).
        parallel: this process's ranks (default one process); fmt: the weights' format or dtype (default float32).
        Built on the meta device (as the loader does), the ops are chosen once the weights have a device."""
        super().__init__()
        self.config, self.parallel, self.fmt = config, parallel or SINGLE, WeightFormat.of(fmt)
        check_tp(config, self.parallel.tp_size)
        p, f = self.parallel, self.fmt
        self.model = Glm4MoeModel(config, p, f)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size, p, f)
        n_mtp = config.num_nextn_predict_layers if mtp in (None, True) else 0
        N = config.num_hidden_layers
        self.mtp = nn.ModuleList(MTPLayer(config, N + j, mtp_own_embed, mtp_own_head, p, f) for j in range(n_mtp))
        if self.lm_head.weight.device.type != "meta":
            self.use_ops(select(self.lm_head.weight.device, f.dtype))

    @property
    def ops(self) -> Ops:
        return self.lm_head.ops

    def use_ops(self, ops: Ops) -> None:
        """Sets the implementation of every op in every layer (glm47.ops.select chooses it)."""
        use(self, ops)

    def official_name(self, name: str) -> str:
        """Our name -> the checkpoint's: the MTP layer j is stored as model.layers.{num_hidden_layers + j}."""
        if name.startswith("mtp."):
            j, _, rest = name[4:].partition(".")
            return f"model.layers.{self.config.num_hidden_layers + int(j)}.{rest}"
        return name

    def checkpoint_entries(self) -> dict[str, Entry]:
        """Every official checkpoint tensor of this model, by key: its full shape and where this rank keeps it."""
        return checkpoint_entries(self, self.packed_modules, self.official_name)

    @property
    def has_mtp(self) -> bool:
        return len(self.mtp) > 0

    @property
    def num_kv_heads(self) -> int:
        """KV heads this rank's attention layers keep (all of them in one process)."""
        return self.model.layers[0].self_attn.num_kv_heads

    @property
    def num_kv_layers(self) -> int:
        """Attention layers a cache holds K/V for: the decoder layers, then the MTP layers (cache index
        num_hidden_layers + j), which attend like any other layer."""
        return self.config.num_hidden_layers + len(self.mtp)

    def forward(self, input_ids: Tensor, positions: Tensor | None = None,
                cache: AttentionCache | None = None) -> Tensor:
        """(B, T) ids -> final-normed hidden states (B, T, H). positions default to 0..T-1 in every row, the
        cache to NoCache (plain causal attention over this call's tokens)."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        return self.model(input_ids, _positions(input_ids, positions), cache or NoCache())

    def mtp_forward(self, hidden: Tensor, next_ids: Tensor, positions: Tensor | None = None,
                    cache: AttentionCache | None = None, layer: int = 0) -> Tensor:
        """MTP layer `layer` on the final-normed hidden states h_i (B, T, H) and the tokens t_{i+1} (B, T) ->
        its output (B, T, H) *before* shared_head.norm: what a further draft step takes as its hidden input,
        and what compute_logits(out, mtp_layer=layer) turns into the logits of t_{i+2}. `positions` are those
        of the hidden states (i)."""
        if not self.has_mtp:
            raise ValueError("this model has no MTP layer (the checkpoint had no MTP weights)")
        positions = _positions(next_ids, positions)
        rope = self.model.rotary_emb(positions, hidden.dtype)
        return self.mtp[layer].forward_mtp(hidden, next_ids, positions, rope, cache or NoCache(),
                                           self.model.embed_tokens)

    def compute_logits(self, hidden: Tensor, mtp_layer: int | None = None) -> Tensor:
        """Logits (..., V) in the model's dtype: of forward's hidden states through lm_head, or, with mtp_layer,
        of that MTP layer's output through its shared_head (norm, then its own head or lm_head). Callers pass
        only the rows they need: a 2,048-token prefill wants one row, not 2,048."""
        if mtp_layer is None:
            return self.lm_head(hidden)
        shared = self.mtp[mtp_layer].shared_head
        return (shared.head or self.lm_head)(shared.norm(hidden))


def _positions(ids: Tensor, positions: Tensor | None) -> Tensor:
    """positions, or 0..T-1 in every row of the (B, T) ids."""
    if positions is not None:
        return positions
    B, T = ids.shape
    return torch.arange(T, device=ids.device).expand(B, T)
