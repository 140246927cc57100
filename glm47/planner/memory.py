"""Bytes: weights in a given format, KV cache per token, and how both split over tensor-parallel GPUs.

Sizes are decimal (1 GB = 1e9 bytes), as GPU memory is sold.

Weight formats:
  - bf16: 2 B per element; the router's e_score_correction_bias is float32 (4 B).
  - fp8, as in GLM-4.7-FP8 (compressed-tensors, channel-wise W8A8): every Linear weight of attention, dense
    MLP, shared and routed experts (in the MTP layer's block too) is float8_e4m3fn, 1 B per element, plus a
    float32 `weight_scale` per output channel ([out, 1]); activations are quantised dynamically, so no
    input scales. Embeddings, LM head, norms, router, biases and the MTP eh_proj stay BF16 (params.py).

KV cache per token = layers x 2 (K and V) x num_key_value_heads x head_dim x element size, where layers
include the MTP layer(s) when MTP is on (the draft layer attends over its own cache).
"""

from __future__ import annotations

from dataclasses import dataclass

from glm47.config import ModelConfig
from glm47.planner.params import BF16, FP32, LINEAR, REPLICATED, SPLIT_KV, SPLIT_TP, TensorFamily

GB = 10**9
QUANTS = ("bf16", "fp8")
KV_DTYPES = {"bf16": 2, "fp8": 1}  # bytes per element
FP8_SCALE_BYTES = 4  # float32 weight_scale, one per output channel


@dataclass(frozen=True, slots=True)
class WeightBytes:
    """Weight bytes of a model in one format, split by how they are stored."""
    quant: str
    linear_params: int  # elements of the Linear weights (FP8 in the fp8 format)
    linear_bytes: int
    bf16_params: int  # elements kept in BF16 in every format
    fp32_params: int
    scale_bytes: int  # FP8 per-channel scales (0 for bf16)

    @property
    def linear_bytes_per_param(self) -> int:
        return 1 if self.quant == "fp8" else 2

    @property
    def total(self) -> int:
        return self.linear_bytes + 2 * self.bf16_params + 4 * self.fp32_params + self.scale_bytes


def _check_quant(quant: str) -> None:
    if quant not in QUANTS:
        raise ValueError(f"unknown weight format {quant!r}; known: {', '.join(QUANTS)}")


def family_bytes(f: TensorFamily, quant: str) -> int:
    if f.storage == FP32:
        return 4 * f.numel
    if f.storage == LINEAR and quant == "fp8":
        return f.numel + FP8_SCALE_BYTES * f.count * f.shape[0]
    return 2 * f.numel


def weight_bytes(families: list[TensorFamily], quant: str) -> WeightBytes:
    _check_quant(quant)
    linear = [f for f in families if f.storage == LINEAR]
    linear_params = sum(f.numel for f in linear)
    return WeightBytes(
        quant=quant,
        linear_params=linear_params,
        linear_bytes=linear_params * (1 if quant == "fp8" else 2),
        bf16_params=sum(f.numel for f in families if f.storage == BF16),
        fp32_params=sum(f.numel for f in families if f.storage == FP32),
        scale_bytes=sum(FP8_SCALE_BYTES * f.count * f.shape[0] for f in linear) if quant == "fp8" else 0,
    )


def weight_bytes_per_gpu(families: list[TensorFamily], quant: str, tp: int, num_key_value_heads: int) -> float:
    """Weight bytes on each of `tp` GPUs. Norms and the router are replicated; k/v projections split by KV
    head, so past tp = num_key_value_heads each rank holds one whole head (replicated); the rest is split."""
    _check_quant(quant)
    shares = {SPLIT_TP: tp, SPLIT_KV: min(tp, num_key_value_heads), REPLICATED: 1}
    return sum(family_bytes(f, quant) / shares[f.split] for f in families)


def kv_layers(c: ModelConfig, mtp: bool) -> int:
    """Attention layers that keep a KV cache: the decoder layers, plus the MTP layer(s) when used."""
    return c.num_hidden_layers + (c.num_nextn_predict_layers if mtp else 0)


def kv_bytes_per_token(c: ModelConfig, kv_dtype: str, mtp: bool) -> int:
    """layers x 2 (K, V) x kv heads x head_dim x bytes per element, summed over all GPUs (no replication)."""
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"unknown KV cache dtype {kv_dtype!r}; known: {', '.join(KV_DTYPES)}")
    return kv_layers(c, mtp) * 2 * c.num_key_value_heads * c.head_dim * KV_DTYPES[kv_dtype]


def kv_shards(c: ModelConfig, tp: int) -> int:
    """How many ways tensor parallelism splits the KV cache: by KV head, so at most num_key_value_heads
    (GLM-4.7: 8). With tp = 16 two ranks hold the same head, so each GPU holds 1/8 of the cache, not 1/16."""
    return min(tp, c.num_key_value_heads)
