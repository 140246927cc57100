"""Parameter counting from a config: the checkpoint's tensors, grouped into families of equal shape.

One inventory serves three questions: how many parameters (total and active per token), how many bytes in a
given format (memory.py), and how they split over tensor-parallel GPUs (memory.py). Each family is one
checkpoint key pattern with a count, e.g. `model.layers.{3..91}.mlp.experts.{0..159}.down_proj.weight` x 14240.

Conventions (documented because published numbers differ on them):
  - "parameters" are all checkpoint tensors, including the float32 `e_score_correction_bias` (a buffer in
    PyTorch, but a tensor in the checkpoint, as the Hugging Face size badge counts it). It is E floats a layer.
  - The MTP layer (index num_hidden_layers) counts in the total unless mtp=False. Its embedding and LM head
    are the main model's (GLM-4.6/4.7 layout), so they are not counted again; GLM-4.5 ships copies of both
    under layer 92, which this count leaves out (a loader may drop or share them).
  - "active per token" is the main model only: MTP is a draft head used for speculative decoding, not part of
    the model's forward pass. It counts everything except routed experts, plus num_experts_per_tok routed
    experts in every MoE layer, and leaves out the embedding and the LM head, as the published figures do:
    that gives 32.08e9 for GLM-4.5 ("32B active") and 12.18e9 for GLM-4.5-Air ("12B"); with embedding and
    head they would be 33.6e9 and 13.4e9. `active_with_embeddings` is the other convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from glm47.config import ModelConfig

# How a tensor is stored. "linear": a Linear weight [out, in], FP8 in the FP8 release (with a float32 scale
# per output channel); "bf16": BF16 in every release (embeddings, LM head, norms, router, biases, eh_proj);
# "fp32": float32 in every release (the router's e_score_correction_bias).
LINEAR, BF16, FP32 = "linear", "bf16", "fp32"
# How tensor parallelism splits a tensor. "tp": over all tp ranks; "kv": by KV head, so over min(tp, kv
# heads) (past that the heads are replicated); "replicated": every rank holds a full copy.
SPLIT_TP, SPLIT_KV, REPLICATED = "tp", "kv", "replicated"

PARTS = ("embedding", "attention", "dense_mlp", "router", "shared_experts", "routed_experts", "norms",
         "lm_head", "mtp")


@dataclass(frozen=True, slots=True)
class TensorFamily:
    """`count` checkpoint tensors named `name` (with {a..b} ranges), each of `shape`."""
    name: str
    count: int
    shape: tuple[int, ...]
    part: str  # one of PARTS; every tensor of the MTP layer is "mtp"
    storage: str  # LINEAR, BF16 or FP32
    split: str  # SPLIT_TP, SPLIT_KV or REPLICATED
    routed: bool = False  # a routed expert: only num_experts_per_tok of n_routed_experts run per token

    @property
    def numel(self) -> int:
        return self.count * math.prod(self.shape)


def _layer_families(c: ModelConfig, first: int, last: int, moe: bool, part: str | None) -> list[TensorFamily]:
    """Tensors of decoder layers first..last (inclusive), all dense or all MoE. part=None: by component."""
    n = last - first + 1
    p = f"model.layers.{{{first}..{last}}}" if n > 1 else f"model.layers.{first}"
    h, d = c.hidden_size, c.head_dim
    q, kv = c.num_attention_heads * d, c.num_key_value_heads * d

    def fam(name, shape, component, storage, split, count=n, routed=False):
        return TensorFamily(f"{p}.{name}", count, shape, part or component, storage, split, routed)

    out = [
        fam("input_layernorm.weight", (h,), "norms", BF16, REPLICATED),
        fam("post_attention_layernorm.weight", (h,), "norms", BF16, REPLICATED),
        fam("self_attn.q_proj.weight", (q, h), "attention", LINEAR, SPLIT_TP),
        fam("self_attn.k_proj.weight", (kv, h), "attention", LINEAR, SPLIT_KV),
        fam("self_attn.v_proj.weight", (kv, h), "attention", LINEAR, SPLIT_KV),
        fam("self_attn.o_proj.weight", (h, q), "attention", LINEAR, SPLIT_TP),  # no bias on o_proj
    ]
    if c.attention_bias:
        out += [fam("self_attn.q_proj.bias", (q,), "attention", BF16, SPLIT_TP),
                fam("self_attn.k_proj.bias", (kv,), "attention", BF16, SPLIT_KV),
                fam("self_attn.v_proj.bias", (kv,), "attention", BF16, SPLIT_KV)]
    if c.use_qk_norm:  # one [head_dim] weight shared by all heads
        out += [fam("self_attn.q_norm.weight", (d,), "norms", BF16, REPLICATED),
                fam("self_attn.k_norm.weight", (d,), "norms", BF16, REPLICATED)]
    if not moe:
        i = c.intermediate_size
        return out + [fam("mlp.gate_proj.weight", (i, h), "dense_mlp", LINEAR, SPLIT_TP),
                      fam("mlp.up_proj.weight", (i, h), "dense_mlp", LINEAR, SPLIT_TP),
                      fam("mlp.down_proj.weight", (h, i), "dense_mlp", LINEAR, SPLIT_TP)]
    E, m = c.n_routed_experts, c.moe_intermediate_size
    s = m * c.n_shared_experts
    e = f"{{0..{E - 1}}}"
    out += [
        fam("mlp.gate.weight", (E, h), "router", BF16, REPLICATED),
        fam("mlp.gate.e_score_correction_bias", (E,), "router", FP32, REPLICATED),
        fam(f"mlp.experts.{e}.gate_proj.weight", (m, h), "routed_experts", LINEAR, SPLIT_TP, n * E, True),
        fam(f"mlp.experts.{e}.up_proj.weight", (m, h), "routed_experts", LINEAR, SPLIT_TP, n * E, True),
        fam(f"mlp.experts.{e}.down_proj.weight", (h, m), "routed_experts", LINEAR, SPLIT_TP, n * E, True),
    ]
    if s:
        out += [fam("mlp.shared_experts.gate_proj.weight", (s, h), "shared_experts", LINEAR, SPLIT_TP),
                fam("mlp.shared_experts.up_proj.weight", (s, h), "shared_experts", LINEAR, SPLIT_TP),
                fam("mlp.shared_experts.down_proj.weight", (h, s), "shared_experts", LINEAR, SPLIT_TP)]
    return out


def tensor_families(c: ModelConfig, mtp: bool = True) -> list[TensorFamily]:
    """Every checkpoint tensor of the model (official layout), grouped; the MTP layer(s) when mtp is true."""
    h, V, N = c.hidden_size, c.vocab_size, c.num_hidden_layers
    dense = min(c.first_k_dense_replace, N)
    out = [TensorFamily("model.embed_tokens.weight", 1, (V, h), "embedding", BF16, SPLIT_TP)]
    if dense:
        out += _layer_families(c, 0, dense - 1, moe=False, part=None)
    if N > dense:
        out += _layer_families(c, dense, N - 1, moe=True, part=None)
    out += [TensorFamily("model.norm.weight", 1, (h,), "norms", BF16, REPLICATED),
            TensorFamily("lm_head.weight", 1, (V, h), "lm_head", BF16, SPLIT_TP)]
    for j in range(c.num_nextn_predict_layers if mtp else 0):
        i = N + j
        out += [TensorFamily(f"model.layers.{i}.enorm.weight", 1, (h,), "mtp", BF16, REPLICATED),
                TensorFamily(f"model.layers.{i}.hnorm.weight", 1, (h,), "mtp", BF16, REPLICATED),
                # BF16 in the FP8 release too: vLLM and SGLang build eh_proj as a plain unquantised
                # nn.Linear (vllm/model_executor/models/glm4_moe_mtp.py), so an FP8 copy would not load.
                TensorFamily(f"model.layers.{i}.eh_proj.weight", 1, (h, 2 * h), "mtp", BF16, REPLICATED),
                TensorFamily(f"model.layers.{i}.shared_head.norm.weight", 1, (h,), "mtp", BF16, REPLICATED)]
        out += _layer_families(c, i, i, moe=c.is_moe_layer(i), part="mtp")
    return out


@dataclass(frozen=True, slots=True)
class ParamCount:
    """Parameter counts of one model; `by_part` maps each of PARTS to its count."""
    total: int  # with the MTP layer(s) when mtp
    active: int  # per token, main model, without embedding and LM head (see the module docstring)
    active_with_embeddings: int  # the same plus embedding and LM head
    main: int  # total without MTP
    mtp_params: int  # the MTP layer(s): their decoder block, norms and eh_proj
    routed_experts: int
    experts_per_token: int
    n_routed_experts: int
    mtp: bool
    by_part: dict[str, int]


def count_params(c: ModelConfig, mtp: bool = True) -> ParamCount:
    families = tensor_families(c, mtp)
    by_part = {part: 0 for part in PARTS}
    for f in families:
        by_part[f.part] += f.numel
    total = sum(by_part.values())
    main = total - by_part["mtp"]
    routed = by_part["routed_experts"]
    # Each MoE layer runs num_experts_per_tok of its n_routed_experts equal-sized experts.
    active_routed = routed * c.num_experts_per_tok // c.n_routed_experts if c.n_routed_experts else 0
    active = main - routed + active_routed
    embeddings = by_part["embedding"] + by_part["lm_head"]
    return ParamCount(total=total, active=active - embeddings, active_with_embeddings=active, main=main,
                      mtp_params=by_part["mtp"],
                      routed_experts=routed, experts_per_token=c.num_experts_per_tok,
                      n_routed_experts=c.n_routed_experts, mtp=mtp and c.num_nextn_predict_layers > 0,
                      by_part=by_part)
