"""The torch twins of every op: what glm47 computes, written plainly. A fast implementation (ops/cpu.py, later a
GPU one) must give these results, rounding at the same points; the tests hold each one to its twin here.

Each op takes the activations and the layer whose weights it uses (`linear(x, layer)`), so that a weight format
with more than one tensor per weight (FP8 + scale) changes the op, never the layer's forward. The numerics follow
the reference implementation: RMSNorm normalises in float32 and casts back before the weight multiply; the
router runs in float32; the routed experts' outputs are weighted and summed in float32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor



def rms_norm_math(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: (B, T, heads, head_dim); cos/sin: (B, T, rotary_dim). Rotates x[..., :rotary_dim] NeoX style
    (rotate-half), the remaining dims pass through unchanged."""
    rot = cos.shape[-1]
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


def select_experts(router_logits: Tensor, bias: Tensor, top_k: int, n_group: int, topk_group: int,
                   norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[Tensor, Tensor]:
    """router_logits: (N, E) float32 -> weights (N, K) float32, expert ids (N, K).

    The bias (e_score_correction_bias) only decides *which* experts are picked; the weights come from the
    unbiased sigmoid scores. With n_group > 1 a group scores the sum of its two best biased scores and
    only the best `topk_group` groups stay eligible."""
    N, E = router_logits.shape
    scores = router_logits.float().sigmoid()
    choice = scores + bias.float()
    if n_group > 1:
        group_scores = choice.view(N, n_group, E // n_group).topk(2, dim=-1).values.sum(-1)  # (N, G)
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(topk_group, dim=-1).indices, True)
        choice = choice.masked_fill(~keep.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids


def gemm_rows(start: int, n: int, small: int = 16) -> list[tuple[int, int]]:
    """Rows [start, start + n) as GEMMs of at most ~log2(n) + 1 sizes: powers of two >= small, then one
    remainder < small. oneDNN (bf16 on CPU) compiles and caches a kernel per GEMM shape, ~0.8 MB each, up
    to 1,024 of them; data-dependent expert row counts would otherwise fill that cache (hundreds of MB)."""
    rows, end = [], start + n
    while end - start >= small:
        m = 1 << ((end - start).bit_length() - 1)
        rows.append((start, start + m))
        start += m
    if start < end:
        rows.append((start, end))
    return rows


def linear(x: Tensor, layer) -> Tensor:
    """x (..., in) @ layer.weight (out, in).T + layer.bias."""
    return F.linear(x, layer.weight, layer.bias)


def rms_norm(x: Tensor, layer) -> Tensor:
    return rms_norm_math(x, layer.weight, layer.eps)


def add_rms_norm(x: Tensor, h: Tensor, layer) -> tuple[Tensor, Tensor]:
    """(x + h, RMSNorm(x + h)): a pre-norm layer's residual add and the next norm."""
    x = x + h
    return x, rms_norm_math(x, layer.weight, layer.eps)


def qk_norm_rope(qkv: Tensor, attn, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """The fused projection's output (B, T, q + 2 kv) -> q (B, T, H, D), k (B, T, Hkv, D): per-head RMSNorm
    (when the layer has q_norm / k_norm, over the whole head, before RoPE), then RoPE on the first rotary dims."""
    B, T, _ = qkv.shape
    q, k, _ = qkv.split(attn.split, dim=-1)
    q = q.view(B, T, attn.num_heads, attn.head_dim)
    k = k.view(B, T, attn.num_kv_heads, attn.head_dim)
    if attn.q_norm is not None:
        q, k = rms_norm(q, attn.q_norm), rms_norm(k, attn.k_norm)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def route(x: Tensor, gate) -> tuple[Tensor, Tensor]:
    """x (N, H) -> routing weights (N, K) float32 and expert ids (N, K): the sigmoid router in float32."""
    logits = F.linear(x.float(), gate.weight)  # (N, E)
    return select_experts(logits, gate.e_score_correction_bias, gate.top_k, gate.n_group, gate.topk_group,
                          gate.norm_topk_prob, gate.scale)


def routed_experts(x: Tensor, w13: Tensor, w2: Tensor, weights: Tensor, ids: Tensor,
                   first: int | None = None) -> Tensor:
    """x: (N, H); stacked experts w13 (E, 2I, H), w2 (E, H, I); weights, ids: (N, K) -> (N, H). Under expert
    parallelism (`first` given) the stack holds experts first .. first + E - 1 and only the token copies routed to
    them are computed: the other ranks' sums complete this one's. Token copies are sorted by expert so each expert
    runs one GEMM (of a few fixed sizes, see gemm_rows) over a contiguous block; the Python loop is over experts
    that received tokens."""
    N, K = ids.shape
    E = w13.shape[0]
    flat = ids.reshape(-1)  # (N*K,) expert of each token copy
    copies = None
    if first is not None:
        flat = flat - first
        copies = torch.nonzero((flat >= 0) & (flat < E)).squeeze(1)  # the copies this rank runs
        flat = flat[copies]
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=E).tolist()  # one host sync per layer
    if copies is not None:
        order = copies[order]  # as indices into all N*K copies
    token_of = order // K  # source token of each sorted copy
    xs = x[token_of]  # (N*K, H) grouped by expert
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        for lo, hi in gemm_rows(start, n):
            gate, up = F.linear(xs[lo:hi], w13[e]).chunk(2, dim=-1)
            out[lo:hi] = F.linear(F.silu(gate) * up, w2[e])
        start += n
    # Weight in float32 (the router's dtype) and sum each token's K copies.
    y = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device)
    y.index_add_(0, token_of, out.float() * weights.reshape(-1)[order, None])
    return y.to(x.dtype)


def moe(x: Tensor, moe) -> Tensor:
    """x (N, H) -> the routed experts' weighted sum plus the shared expert's output (added in x's dtype; the
    shared expert is the block's own MLP module, its down_proj not reduced). The router is called as a module, so
    that training's forward hooks (training/balance.py) see its choices."""
    weights, ids = moe.gate(x)
    y = routed_experts(x, moe.experts.w13, moe.experts.w2, weights, ids, moe.experts.local_first)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x)
    return y


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, causal: bool = False) -> Tensor:
    """q: (B, T, H, D); k, v: (B, S, Hkv, D) -> (B, T, H, D). GQA via enable_gqa, scale 1/sqrt(D)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=causal, enable_gqa=True)
    return o.transpose(1, 2)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, mask: Tensor | None,
                     length: int, lens: Tensor) -> Tensor:
    """One query per sequence over the paged cache. q: (B, H, D); caches (num_blocks, block_size, Hkv, D);
    block_tables: (B, nb); mask: (B, 1, 1, nb * block_size) True where a key exists, or None with B == 1 (then
    the first `length` keys are used); lens: (B,) keys each query sees -> (B, H, D)."""
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


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
                      context_len: int) -> Tensor:
    """One sequence's chunk: q (n, H, D); k, v (n, Hkv, D) of the chunk itself, already written to the cache;
    block_table (nb,) covers its context_len + n keys -> (n, H, D), causal. Without context the chunk attends to
    itself (no cache read); with context it reads its blocks back from the cache."""
    n, ctx = q.shape[0], context_len
    if ctx == 0:
        return sdpa(q[None], k[None], v[None], causal=n > 1)[0]
    kc = k_cache[block_table].flatten(0, 1)[:ctx + n].to(q.dtype)  # (S, Hkv, D)
    vc = v_cache[block_table].flatten(0, 1)[:ctx + n].to(q.dtype)
    if ctx >= n:  # a long context: an explicit (n, S) causal mask shifted by the context
        rows = torch.arange(ctx, ctx + n, device=q.device)
        mask = torch.arange(ctx + n, device=q.device)[None, :] <= rows[:, None]
        return sdpa(q[None], kc[None], vc[None], mask)[0]
    # A short context: SDPA's causal mask is aligned top-left, so prepend ctx zero queries and drop their
    # rows. Wastes ctx^2 / 2 scores where the explicit mask would waste n^2 / 2 (it cannot skip blocks).
    q = torch.cat([q.new_zeros(ctx, *q.shape[1:]), q])
    return sdpa(q[None], kc[None], vc[None], causal=True)[0, ctx:]
