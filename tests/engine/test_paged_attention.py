"""Paged attention (ForwardBatch.attend) against its slow twin, the contiguous KVCache with plain SDPA, on
random inputs: varied context and chunk lengths, block sizes, GQA ratios, scattered block tables."""

import pytest
import torch

from glm47.engine.paged_attention import ForwardBatch, KVPool
from glm47.engine.step import Layout
from glm47.model.kv_cache import KVCache

# (context already cached, tokens computed this step) per sequence: decodes, a one-token prompt,
# fresh prefills, and prefill chunks after a long (masked path) or short (padded-query path) context.
ROWS = [(5, 1), (0, 1), (31, 1), (16, 1), (0, 7), (9, 6), (0, 1 + 16), (20, 13), (3, 10)]


def run_case(block_size, heads, kv_heads, rows, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = 16
    need = [-(-(c + n) // block_size) for c, n in rows]
    pool = KVPool(1, sum(need) + 3, block_size, kv_heads, D, dtype)
    ids = torch.randperm(sum(need) + 3, generator=g).tolist()  # scattered, not contiguous, blocks
    tables = [[ids.pop() for _ in range(k)] for k in need]
    q = [torch.randn(n, heads, D, generator=g).to(dtype) for _, n in rows]
    k = [torch.randn(c + n, kv_heads, D, generator=g).to(dtype) for c, n in rows]
    v = [torch.randn(c + n, kv_heads, D, generator=g).to(dtype) for c, n in rows]

    # Fill the contexts through the cache protocol too: one step that prefills all of them.
    ctx_rows = sorted((i for i, (c, _) in enumerate(rows) if c), key=lambda i: rows[i][0] > 1)
    if ctx_rows:
        fb = ForwardBatch.build(pool, Layout.of([tables[i] for i in ctx_rows], [0] * len(ctx_rows),
                                                [rows[i][0] for i in ctx_rows], block_size))
        ctx_k = torch.cat([k[i][:rows[i][0]] for i in ctx_rows])[None]
        ctx_v = torch.cat([v[i][:rows[i][0]] for i in ctx_rows])[None]
        fb.attend(0, torch.zeros(1, ctx_k.shape[1], heads, D, dtype=dtype), ctx_k, ctx_v, None)

    # The step under test, single-token rows first as the runner orders them.
    order = sorted(range(len(rows)), key=lambda i: rows[i][1] > 1)
    fb = ForwardBatch.build(pool, Layout.of([tables[i] for i in order], [rows[i][0] for i in order],
                                            [rows[i][1] for i in order], block_size))
    new_q = torch.cat([q[i] for i in order])[None]
    new_k = torch.cat([k[i][rows[i][0]:] for i in order])[None]
    new_v = torch.cat([v[i][rows[i][0]:] for i in order])[None]
    got = fb.attend(0, new_q, new_k, new_v, None)[0]

    start = 0
    for i in order:
        c, n = rows[i]
        dense = KVCache(1, 1, c + n, kv_heads, D, dtype)
        if c:
            dense.attend(0, torch.zeros(1, c, heads, D, dtype=dtype), k[i][None, :c], v[i][None, :c],
                         torch.arange(c)[None])
        want = dense.attend(0, q[i][None], k[i][None, c:], v[i][None, c:], torch.arange(c, c + n)[None])[0]
        err = (got[start:start + n].float() - want.float()).abs().max().item()
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert err < tol, f"row {i} (context {c}, new {n}), block_size {block_size}: max err {err:.3g}"
        start += n


@pytest.mark.parametrize("block_size", [1, 3, 16])
@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (8, 1), (4, 4)])
def test_paged_attention_matches_dense_cache(block_size, heads, kv_heads):
    run_case(block_size, heads, kv_heads, ROWS)


SINGLE = {"one-decode": [(37, 1)], "one-prefill": [(0, 5)], "chunk-after-long-context": [(12, 4)],
          "chunk-after-short-context": [(2, 9)], "decodes-only": [(3, 1), (40, 1), (0, 1)]}


@pytest.mark.parametrize("rows", list(SINGLE.values()), ids=list(SINGLE))
def test_paged_attention_single_phase_batches(rows):
    run_case(4, 4, 2, rows)


def test_paged_attention_bfloat16():
    run_case(8, 8, 2, ROWS, dtype=torch.bfloat16)


def test_slot_mapping_follows_the_block_tables():
    pool = KVPool(1, 10, 4, 1, 2, torch.float32)
    layout = Layout.of([[7], [2, 9, 4]], [2, 3], [1, 6], 4)
    # row 0: position 2 in block 7; row 1: positions 3..8 across blocks 2, 9, 4
    assert layout.slot_mapping == [30, 11, 36, 37, 38, 39, 16]
    assert layout.positions == [2, 3, 4, 5, 6, 7, 8]
    fb = ForwardBatch.build(pool, layout)
    assert fb.slot_mapping.tolist() == [30, 11, 36, 37, 38, 39, 16]
    assert fb.num_decodes == 1 and fb.decode_len == 3
    assert [(c.start, c.end, c.context_len) for c in fb.prefills] == [(1, 7, 3)]
