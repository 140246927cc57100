"""Paged KV-cache bookkeeping: which physical block holds which tokens of which sequence.

Prefix caching: a full block is keyed by a chained hash of all tokens up to its end, so a hit on block i
implies blocks 0..i-1 match too. Blocks are reference counted; a block whose last user leaves keeps its
hash and waits in the free pool, evicted least-recently-freed first. Knows nothing about tensors:
model_runner turns block tables into slot numbers.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from glm47.engine.sequence import Sequence


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """Chained block key: blake2b (128-bit) of the parent block's key and this block's token ids. A
    cryptographic hash, so that one user cannot craft a prompt that collides with another's cached prefix."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # set while the block is findable by the prefix cache


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (first = next to be reused); values unused. An OrderedDict so that
        # reviving a cached block from the middle is O(1).
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached: dict[bytes, int] = {}  # hash -> block id

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by live sequences (free cached blocks count as free)."""
        return 1.0 - len(self.free_queue) / len(self.blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache -------------------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """seq.block_hashes extended to at least num_blocks full blocks (they never change once computed)."""
        hashes, bs = seq.block_hashes, self.block_size
        for i in range(len(hashes), num_blocks):
            hashes.append(hash_block(hashes[-1] if hashes else b"", seq.token_ids[i * bs:(i + 1) * bs]))
        return hashes

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding seq's leading full blocks. Never the whole sequence: at least its last
        token is left to compute, because the step that computes it yields the next token's logits."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for h in self._block_hashes(seq, (len(seq) - 1) // self.block_size):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _register(self, seq: Sequence, num_tokens: int) -> None:
        """Makes seq's blocks that are full within its first num_tokens tokens findable. Called when the
        tokens are scheduled, before their K/V is written: safe, since a step writes every token's K/V into
        the cache before any attention reads it (see paged_attention.ForwardBatch.attend)."""
        full = num_tokens // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_registered_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            block = self.blocks[seq.block_table[i]]
            # An identical block computed by another sequence keeps the key; this copy stays unnamed and
            # is the first to be reused once freed.
            if block.hash is None and hashes[i] not in self.cached:
                block.hash = hashes[i]
                self.cached[hashes[i]] = block.block_id
        seq.num_registered_blocks = full

    # ---- allocation ---------------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_new_tokens: int, hits: list[int] | None = None) -> bool:
        """Grows seq's block table to hold its next num_new_tokens tokens. A sequence with no blocks yet
        first takes the prefix-cache hits (from match_prefix) and counts their tokens as computed. Returns
        False, changing nothing, when the free pool is too small."""
        hits = hits or []
        assert not hits or (not seq.block_table and seq.num_computed_tokens == 0), seq
        computed = seq.num_computed_tokens + len(hits) * self.block_size
        num_new_blocks = self.blocks_for(computed + num_new_tokens) - len(seq.block_table) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # hits that sit in the free pool
        if num_new_blocks + revived > len(self.free_queue):
            return False
        if not seq.block_table:  # first allocation since (re)admission
            seq.num_cached_tokens = min(len(hits) * self.block_size, seq.num_prompt_tokens)
        for b in hits:
            self._acquire(b)
        seq.block_table.extend(hits)
        if hits:
            seq.num_computed_tokens, seq.num_registered_blocks = computed, len(hits)
        for _ in range(num_new_blocks):
            seq.block_table.append(self._take_free())
        self._register(seq, min(computed + num_new_tokens, len(seq)))  # draft positions are no tokens yet
        return True

    def free(self, seq: Sequence) -> None:
        """Releases all of seq's blocks (last block first, so a prefix outlives its tails in the LRU)."""
        for b in reversed(seq.block_table):
            self._release(b)
        seq.block_table.clear()
        seq.num_computed_tokens = seq.num_registered_blocks = 0

    # ---- the free pool ------------------------------------------------------------------------------
    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _take_free(self) -> int:
        block_id, _ = self.free_queue.popitem(last=False)  # least recently freed
        block = self.blocks[block_id]
        self._forget(block)  # evicts its cached contents, if any
        block.ref_count = 1
        return block_id

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        assert block.ref_count > 0, block
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.hash is None:  # nothing worth keeping: reuse it before any cached block
                self.free_queue.move_to_end(block_id, last=False)

    def _forget(self, block: Block) -> None:
        if block.hash is not None:
            if self.cached.get(block.hash) == block.block_id:
                del self.cached[block.hash]
            block.hash = None
