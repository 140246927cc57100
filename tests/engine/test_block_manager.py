"""BlockManager: allocation, reference counts, prefix-cache hits, LRU eviction, truncation, freeing."""

import pytest

from glm47.engine.block_manager import BlockManager, hash_block
from glm47.engine.sampling import SamplingParams
from glm47.engine.sequence import Sequence

BS = 4


def seq(tokens, rid="r"):
    return Sequence(rid, list(tokens), SamplingParams(max_tokens=8), 8, frozenset())


def admit(bm, s, n=None):
    """As the scheduler does: take the prefix hits, then room for n (default: all remaining) tokens."""
    hits = bm.match_prefix(s)
    n = len(s) - len(hits) * BS if n is None else n
    assert bm.allocate(s, n, hits)
    return hits


def test_allocation_takes_blocks_for_the_chunk_only_and_free_restores_the_pool():
    bm = BlockManager(8, BS)
    s = seq(range(10))
    admit(bm, s, n=5)  # a first prefill chunk of 5 tokens needs 2 blocks
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6
    s.num_computed_tokens = 5
    assert bm.allocate(s, 5)  # the rest: tokens 5..9 -> 3 blocks in all
    assert len(s.block_table) == 3 and bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    bm.free(s)
    assert bm.num_free_blocks == 8 and s.block_table == [] and s.num_computed_tokens == 0


def test_allocation_fails_without_side_effects_when_the_pool_is_short():
    bm = BlockManager(2, BS)
    s = seq(range(9))  # needs 3 blocks
    assert not bm.allocate(s, 9)
    assert s.block_table == [] and bm.num_free_blocks == 2


def test_identical_prefix_is_shared_and_reference_counted():
    bm = BlockManager(8, BS)
    a, b = seq(range(10), "a"), seq(list(range(8)) + [50, 51, 52], "b")
    admit(bm, a)
    hits = admit(bm, b)
    assert hits == a.block_table[:2], "b's two leading full blocks are a's"
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table[:2]] == [1, 1]
    assert bm.num_free_blocks == 8 - 3  # b holds 3 blocks (2 shared + its own)


def test_hash_is_chained_so_equal_blocks_after_different_prefixes_do_not_match():
    bm = BlockManager(8, BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9], "a")
    admit(bm, a)
    b = seq([9, 9, 9, 9, 5, 6, 7, 8, 9], "b")  # second block equal to a's, first differs
    assert bm.match_prefix(b) == []
    assert hash_block(b"", [1, 2, 3, 4]) != hash_block(b"", [1, 2, 3, 5])


def test_the_last_token_is_never_a_hit_so_the_step_has_logits_to_sample():
    bm = BlockManager(8, BS)
    a = seq(range(8), "a")  # exactly two full blocks
    admit(bm, a)
    b = seq(range(8), "b")
    assert len(bm.match_prefix(b)) == 1  # (8 - 1) // 4: the second block is recomputed


def test_freed_cached_blocks_are_hits_until_evicted_least_recently_freed_first():
    bm = BlockManager(6, BS)
    a, b = seq(range(100, 109), "a"), seq(range(200, 209), "b")  # 3 blocks each, the first 2 full
    admit(bm, a)
    bm.free(a)
    admit(bm, b)
    bm.free(b)
    a_prefix, b_prefix = seq(range(100, 109)), seq(range(200, 209))
    assert len(bm.match_prefix(a_prefix)) == 2 and len(bm.match_prefix(b_prefix)) == 2
    admit(bm, seq(range(300, 305), "c"))  # 2 blocks: the unhashed ones go first
    assert len(bm.match_prefix(a_prefix)) == 2 and len(bm.match_prefix(b_prefix)) == 2
    admit(bm, seq(range(400, 403), "d"))  # 1 block: a's were freed before b's, and a's tail before its head
    assert len(bm.match_prefix(a_prefix)) == 1, "a's second block should have been evicted, not its first"
    admit(bm, seq(range(500, 503), "e"))
    assert bm.match_prefix(a_prefix) == [], "a's prefix should have been evicted"
    assert len(bm.match_prefix(b_prefix)) == 2, "b's prefix should have survived"


def test_reviving_a_freed_cached_block_counts_against_the_free_pool():
    bm = BlockManager(3, BS)
    a = seq(range(9), "a")
    admit(bm, a)
    bm.free(a)  # 2 cached blocks + 1 plain block, all free
    b = seq(list(range(8)) + [77, 78, 79, 80, 81], "b")  # 2 hits + 2 new blocks = 4 > 3
    hits = bm.match_prefix(b)
    assert len(hits) == 2
    assert not bm.allocate(b, len(b) - 8, hits)
    assert bm.num_free_blocks == 3 and all(bm.blocks[h].ref_count == 0 for h in hits)


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    admit(bm, seq(range(10), "a"))
    assert bm.match_prefix(seq(range(10), "b")) == [] and not bm.cached
