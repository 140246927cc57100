"""Attention over the paged KV cache for one step's flat batch of many sequences.

`KVPool` holds K and V for every layer as [num_blocks, block_size, Hkv, D] each; the token at position p
of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size. `ForwardBatch`
implements the model's cache protocol (`attend`): it writes the step's K/V into their slots, then runs the
decodes (one query each, first in the batch) as one op over their blocks and each prefill chunk as its own
(the model's ops: glm47.ops; the torch twins gather the blocks for SDPA). Knows block tables, not sequences
(it is built from a step.Layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from glm47.engine.step import Layout
from glm47.model.memory import huge_buffer
from glm47.ops import REFERENCE, Ops


class KVPool:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        device = torch.device(device)
        if device.type == "cpu":
            # Anonymous mmap (on huge pages where the OS gives them): zero-filled by the OS and resident only
            # once touched, so a large pool costs RAM as it fills, and never-written slots are 0 (not NaN:
            # padded keys are read, then masked).
            numel = torch.Size(shape).numel()
            kv = huge_buffer(numel * dtype.itemsize).view(dtype).view(shape)
        else:
            kv = torch.zeros(shape, dtype=dtype, device=device)
        self.k, self.v = kv[0], kv[1]  # (layers, num_blocks, block_size, Hkv, D)

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def write_kv(k_cache: Tensor, v_cache: Tensor, slot_mapping: Tensor, k: Tensor, v: Tensor) -> None:
    """k_cache, v_cache: (num_blocks, block_size, Hkv, D); k, v: (T, Hkv, D) go to slots (T,)."""
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


@dataclass(slots=True)
class PrefillChunk:
    start: int  # token range [start, end) in the flat batch
    end: int
    context_len: int  # tokens of this sequence already in the cache before the chunk
    block_table: Tensor  # (nb,) blocks covering context + chunk


@dataclass(slots=True)
class ForwardBatch:
    """One step's metadata, shared by every layer. The model runs the flat batch as B=1, T=total tokens;
    the first num_decodes tokens are single-token sequences, then the prefill chunks follow."""

    kv: KVPool
    slot_mapping: Tensor  # (T,) cache slot of each token
    num_decodes: int
    decode_block_tables: Tensor | None  # (num_decodes, max blocks), short rows padded with block 0
    decode_mask: Tensor | None  # (num_decodes, 1, 1, max blocks * block_size); None when num_decodes <= 1
    decode_len: int  # keys of the single decode when num_decodes == 1
    decode_lens: Tensor | None  # (num_decodes,) keys each decode sees
    prefills: list[PrefillChunk]
    ops: Ops = REFERENCE  # the model's: decode_attention and prefill_attention (glm47.ops; twins in ops/reference.py)

    @classmethod
    def build(cls, kv: KVPool, layout: Layout, ops: Ops = REFERENCE) -> ForwardBatch:
        """The tensors of a step's layout (step.py; all single-token rows first). One host->device copy per
        field."""
        bs, dev = kv.block_size, kv.k.device
        block_tables, context_lens, query_lens = layout.block_tables, layout.context_lens, layout.query_lens
        d = 0
        while d < len(query_lens) and query_lens[d] == 1:
            d += 1
        tables = mask = decode_lens = None
        length = 0
        if d:
            lens = [c + 1 for c in context_lens[:d]]  # keys each decode sees, itself included
            width = -(-max(lens) // bs)
            tables = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in block_tables[:d]],
                                  dtype=torch.long, device=dev)
            decode_lens = torch.tensor(lens, dtype=torch.long, device=dev)
            if d == 1:
                length = lens[0]
            else:
                keys = torch.arange(width * bs, device=dev)
                mask = (keys < decode_lens[:, None])[:, None, None, :]
        prefills, start = [], d
        for table, ctx, n in zip(block_tables[d:], context_lens[d:], query_lens[d:]):
            table = torch.tensor(table[:-(-(ctx + n) // bs)], dtype=torch.long, device=dev)
            prefills.append(PrefillChunk(start, start + n, ctx, table))
            start += n
        slot_mapping = torch.tensor(layout.slot_mapping, dtype=torch.long, device=dev)
        return cls(kv, slot_mapping, d, tables, mask, length, decode_lens, prefills, ops)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q: (1, T, H, D); k, v: (1, T, Hkv, D) -> (1, T, H, D). All K/V are written before any attention
        runs, which is what lets a sequence use blocks another one fills in the same step."""
        q, k, v = q[0], k[0], v[0]
        k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
        write_kv(k_cache, v_cache, self.slot_mapping, k, v)
        d = self.num_decodes
        ops = self.ops
        if not self.prefills:
            return ops.decode_attention(q, k_cache, v_cache, self.decode_block_tables, self.decode_mask,
                                        self.decode_len, self.decode_lens)[None]
        out = torch.empty_like(q)
        if d:
            out[:d] = ops.decode_attention(q[:d], k_cache, v_cache, self.decode_block_tables, self.decode_mask,
                                           self.decode_len, self.decode_lens)
        for c in self.prefills:
            out[c.start:c.end] = ops.prefill_attention(q[c.start:c.end], k[c.start:c.end], v[c.start:c.end],
                                                       k_cache, v_cache, c.block_table, c.context_len)
        return out[None]
