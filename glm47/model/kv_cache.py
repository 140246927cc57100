"""Attention over a key/value store. The model's attention computes q, k, v and hands them to a cache
object's `attend(layer_idx, q, k, v, positions)` (the AttentionCache protocol); the cache decides where K/V
live and how to attend.

`NoCache` is the plain causal forward; `KVCache` is a contiguous per-layer store for incremental
decoding (the reference the engine's paged cache, engine/paged_attention.ForwardBatch, is tested against).
None of them knows about sequences.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import Tensor

from glm47.ops.reference import sdpa


@runtime_checkable
class AttentionCache(Protocol):
    """What Attention calls once per layer and forward pass. Layer indices run over the model's
    num_kv_layers: the decoder layers, then the MTP layers."""

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q: (B, T, H, D); k, v: (B, T, Hkv, D) of this pass's tokens, at positions (B, T) (a cache may
        know them already and ignore them) -> (B, T, H, D): each query attends causally to the keys of its
        sequence up to its own position, these k, v included (the cache keeps them for later passes)."""
        ...


class NoCache:
    """Full causal attention over the tokens of this call only (positions 0..T-1 in every row)."""

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        return sdpa(q, k, v, causal=q.shape[1] > 1)


class KVCache:
    """Contiguous K/V: (layers, batch, max_len, kv_heads, head_dim). Row b stores the token at position p
    in slot p, so rows may be at different lengths; a query at position p sees slots 0..p of its row."""

    def __init__(self, num_layers: int, batch: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (num_layers, batch, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len

    @classmethod
    def for_model(cls, config, batch: int, max_len: int, dtype: torch.dtype = torch.float32,
                  device: str | torch.device = "cpu") -> KVCache:
        """One slot per decoder layer plus the MTP layers (which attend like any other layer)."""
        layers = config.num_hidden_layers + config.num_nextn_predict_layers
        return cls(layers, batch, max_len, config.num_key_value_heads, config.head_dim, dtype, device)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        B, T = positions.shape
        end = int(positions.max()) + 1
        if end > self.max_len:
            raise ValueError(f"position {end - 1} is beyond the cache length {self.max_len}")
        rows = torch.arange(B, device=positions.device)[:, None].expand(B, T)
        self.k[layer_idx][rows, positions] = k.to(self.k.dtype)
        self.v[layer_idx][rows, positions] = v.to(self.v.dtype)
        slots = torch.arange(end, device=positions.device)
        mask = (slots[None, None, :] <= positions[:, :, None])[:, None]  # (B, 1, T, S): causal per row
        return sdpa(q, self.k[layer_idx, :, :end].to(q.dtype), self.v[layer_idx, :, :end].to(q.dtype), mask)
