"""FP8 checkpoints (GLM-4.7-FP8 and the DeepSeek-style layout), dequantised to the compute dtype at load.

Two layouts carry an FP8 weight `<module>.weight` (float8_e4m3fn, [out, in]) and a float32 scale:
  - compressed-tensors, as in GLM-4.7-FP8: `<module>.weight_scale`, per output channel [out, 1] (or one
    per tensor); activations are quantised dynamically, so there is no input scale to keep.
  - block-wise: `<module>.weight_scale_inv` [ceil(out/B), ceil(in/B)], one scale per B x B block.
W = fp8.float() * scale. Static `.input_scale` tensors are accepted and ignored (we compute in bf16).
Keeping the weights in FP8 with FP8 GEMMs is a GPU path this module does not provide yet.
"""

from __future__ import annotations

import math

import torch

SCALE_SUFFIXES = (".weight_scale_inv", ".weight_scale")
IGNORED_SUFFIXES = (".input_scale",)


def scale_key_of(key: str) -> str | None:
    """`x.weight_scale` / `x.weight_scale_inv` -> `x.weight`; anything else -> None."""
    for suffix in SCALE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)] + ".weight"
    return None


def dequantize(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight: FP8 [out, in]; scale: [] / [1] (per tensor), [out] / [out, 1] (per channel) or
    [ceil(out/B), ceil(in/B)] (per block). Returns float32 [out, in]."""
    w = weight.float()
    out_dim, in_dim = w.shape
    s = scale.float()
    if s.numel() == 1:
        return w * s.reshape(())
    if s.numel() == out_dim and (s.dim() == 1 or s.shape[-1] == 1):
        return w * s.reshape(out_dim, 1)
    if s.dim() == 2:
        block_out, block_in = math.ceil(out_dim / s.shape[0]), math.ceil(in_dim / s.shape[1])
        if math.ceil(out_dim / block_out) == s.shape[0] and math.ceil(in_dim / block_in) == s.shape[1]:
            full = s.repeat_interleave(block_out, 0).repeat_interleave(block_in, 1)[:out_dim, :in_dim]
            return w * full
    raise ValueError(f"scale of shape {list(scale.shape)} does not fit an FP8 weight of shape {list(weight.shape)}")
