"""The MoE block of GLM-4.x: a sigmoid router with the loss-free-balancing bias, group-limited top-k,
routed experts run grouped by expert, and a shared expert that every token goes through.

`select_experts` is the routing math as a pure function. Experts are stored stacked ([E, 2I, H] and
[E, H, I]) so a layer's experts are one tensor each; the checkpoint's per-expert tensors load into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm47 import kernels
from glm47.config import ModelConfig
from glm47.model.layers import MLP


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


class Router(nn.Module):
    """`mlp.gate`: weight [E, H] and e_score_correction_bias [E], both kept in float32 (the router runs in
    float32 in the reference; storing the weight in float32 saves a cast per step and changes no value)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(E, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scale = config.norm_topk_prob, config.routed_scaling_factor

    def _apply(self, fn, recurse=True):
        # model.to(bfloat16) must not round the balancing bias (it decides near-ties between experts).
        super()._apply(fn, recurse)
        self.weight.data = self.weight.data.float()
        self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = F.linear(x.float(), self.weight)  # (N, E)
        return select_experts(logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                              self.norm_topk_prob, self.scale)


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


class Experts(nn.Module):
    """Routed experts, stacked: w13[e] = [gate_proj; up_proj] of expert e, w2[e] = its down_proj."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: Tensor, weights: Tensor, ids: Tensor) -> Tensor:
        """x: (N, H); weights, ids: (N, K) -> (N, H). Token copies are sorted by expert so each expert runs
        one GEMM over a contiguous block; the Python loop is over experts that received tokens. The twin of
        kernels.routed_experts, which MoE.forward calls instead on an AVX512-BF16 CPU (it rounds where this does)."""
        N, K = ids.shape
        flat = ids.reshape(-1)  # (N*K,) expert of each token copy
        order = flat.argsort(stable=True)
        token_of = order // K  # source token of each sorted copy
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host sync per layer
        xs = x[token_of]  # (N*K, H) grouped by expert
        out = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts):
            for lo, hi in gemm_rows(start, n):
                gate, up = F.linear(xs[lo:hi], self.w13[e]).chunk(2, dim=-1)
                out[lo:hi] = F.linear(F.silu(gate) * up, self.w2[e])
            start += n
        # Weight in float32 (the router's dtype) and sum each token's K copies.
        y = torch.zeros(N, x.shape[-1], dtype=torch.float32, device=x.device)
        y.index_add_(0, token_of, out.float() * weights.reshape(-1)[order, None])
        return y.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        gate, experts, shared = self.gate, self.experts, self.shared_experts
        if kernels.fits(x, experts.w13, kernels.EXPERTS_MAX_TOKENS):
            # bf16 on an AVX512-BF16 CPU: the router (for a decode step's few tokens) and then the routed and
            # shared experts in one call each; the code below is their twin.
            if kernels.fits(x, experts.w13, kernels.ROUTE_MAX_TOKENS):
                weights, ids = kernels.route(x, gate.weight, gate.e_score_correction_bias, gate.top_k, gate.n_group,
                                             gate.topk_group, gate.norm_topk_prob, gate.scale)
            else:
                weights, ids = gate(x)
            y = kernels.routed_experts(x, experts.w13, experts.w2, weights, ids,
                                       *((shared.gate_up_proj.weight, shared.down_proj.weight) if shared else ()))
            return y.view(shape)
        weights, ids = gate(x)
        y = experts(x, weights, ids)
        if shared is not None:
            y = y + shared(x)
        return y.view(shape)
