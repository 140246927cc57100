"""Attention over the paged KV cache for one step's flat batch of many sequences.

`KVPool` holds K and V for every layer as [num_blocks, block_size, Hkv, D] each; the token at position p
of a sequence lives in slot block_table[p // block_size] * block_size + p % block_size. `ForwardBatch`
implements the model's cache protocol (`attend`): it writes the step's K/V into their slots, then runs the
decodes (one query each, first in the batch) as a single masked SDPA over their gathered blocks and each
prefill chunk as its own SDPA. Knows block tables, not sequences (model_runner builds it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from glm47 import kernels
from glm47.model.kv_cache import sdpa
from glm47.model.memory import huge_buffer


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


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, mask: Tensor | None,
                     length: int, lens: Tensor) -> Tensor:
    """One query per sequence. q: (B, H, D); block_tables: (B, nb); mask: (B, 1, 1, nb * block_size) True
    where a key exists, or None with B == 1 (then the first `length` keys are used); lens: (B,) keys each
    query sees -> (B, H, D). bf16 on an AVX512-BF16 CPU reads the blocks in place (glm47.kernels) instead of
    gathering them for SDPA, its twin."""
    if kernels.fits(q, k_cache) and q.shape[-1] % 32 == 0:
        return kernels.decode_attention(q, k_cache, v_cache, block_tables, lens)
    B, H, D = q.shape
    Hkv = k_cache.shape[2]
    k = k_cache[block_tables].flatten(1, 2)  # (B, S, Hkv, D), padded rows point at real (finite) blocks
    v = v_cache[block_tables].flatten(1, 2)
    if mask is None:
        k, v = k[:, :length], v[:, :length]
    # The H // Hkv query heads sharing a KV head act as that many query rows: GQA without repeating K/V,
    # several times faster on CPU than enable_gqa for a single query.
    o = F.scaled_dot_product_attention(q.view(B, Hkv, H // Hkv, D).to(k.dtype), k.transpose(1, 2),
                                       v.transpose(1, 2), attn_mask=mask)  # (B, Hkv, H // Hkv, D)
    return o.reshape(B, H, D).to(q.dtype)


@dataclass(slots=True)
class PrefillChunk:
    start: int  # token range [start, end) in the flat batch
    end: int
    context_len: int  # tokens of this sequence already in the cache before the chunk
    block_table: Tensor  # (nb,) blocks covering context + chunk


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                      chunk: PrefillChunk) -> Tensor:
    """q: (n, H, D); k, v: (n, Hkv, D) of the chunk itself, already written to the cache -> (n, H, D), causal.
    bf16 on an AVX512-BF16 CPU runs a flash-attention kernel over the blocks in place (glm47.kernels). Its
    twin, SDPA: without context the chunk attends to itself (no cache read); with context it reads its
    blocks back from the cache."""
    n, ctx = q.shape[0], chunk.context_len
    if kernels.fits(q, k_cache) and q.shape[-1] % 32 == 0:
        return kernels.prefill_attention(q, k_cache, v_cache, chunk.block_table, ctx)
    if ctx == 0:
        return sdpa(q[None], k[None], v[None], causal=n > 1)[0]
    kc = k_cache[chunk.block_table].flatten(0, 1)[:ctx + n].to(q.dtype)  # (S, Hkv, D)
    vc = v_cache[chunk.block_table].flatten(0, 1)[:ctx + n].to(q.dtype)
    if ctx >= n:  # a long context: an explicit (n, S) causal mask shifted by the context
        rows = torch.arange(ctx, ctx + n, device=q.device)
        mask = torch.arange(ctx + n, device=q.device)[None, :] <= rows[:, None]
        return sdpa(q[None], kc[None], vc[None], mask)[0]
    # A short context: SDPA's causal mask is aligned top-left, so prepend ctx zero queries and drop their
    # rows. Wastes ctx^2 / 2 scores where the explicit mask would waste n^2 / 2 (it cannot skip blocks).
    q = torch.cat([q.new_zeros(ctx, *q.shape[1:]), q])
    return sdpa(q[None], kc[None], vc[None], causal=True)[0, ctx:]


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

    @classmethod
    def build(cls, kv: KVPool, block_tables: list[list[int]], context_lens: list[int],
              query_lens: list[int]) -> ForwardBatch:
        """Per sequence, in batch order (all query_len == 1 first): its block table, the tokens already
        cached, and the tokens computed this step. One host->device copy per field."""
        bs, dev = kv.block_size, kv.k.device
        slots: list[int] = []
        for table, ctx, n in zip(block_tables, context_lens, query_lens):
            p, end = ctx, ctx + n
            while p < end:  # one range per block the chunk touches
                b = p // bs
                hi = min(end, (b + 1) * bs)
                base = (table[b] - b) * bs  # slot of position p is base + p
                slots.extend(range(base + p, base + hi))
                p = hi
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
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        return cls(kv, slot_mapping, d, tables, mask, length, decode_lens, prefills)

    def attend(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> Tensor:
        """q: (1, T, H, D); k, v: (1, T, Hkv, D) -> (1, T, H, D). All K/V are written before any attention
        runs, which is what lets a sequence use blocks another one fills in the same step."""
        q, k, v = q[0], k[0], v[0]
        k_cache, v_cache = self.kv.k[layer_idx], self.kv.v[layer_idx]
        write_kv(k_cache, v_cache, self.slot_mapping, k, v)
        d = self.num_decodes
        if not self.prefills:
            return decode_attention(q, k_cache, v_cache, self.decode_block_tables, self.decode_mask,
                                    self.decode_len, self.decode_lens)[None]
        out = torch.empty_like(q)
        if d:
            out[:d] = decode_attention(q[:d], k_cache, v_cache, self.decode_block_tables, self.decode_mask,
                                       self.decode_len, self.decode_lens)
        for c in self.prefills:
            out[c.start:c.end] = prefill_attention(q[c.start:c.end], k[c.start:c.end], v[c.start:c.end],
                                                   k_cache, v_cache, c)
        return out[None]
