"""The MoE block of GLM-4.x: a sigmoid router with the loss-free-balancing bias, group-limited top-k, routed
experts (stacked, FusedExperts) and a shared expert that every token goes through.

The routing math (`select_experts`) and the grouped routed-experts computation are the torch twins in
glm47/ops/reference.py; the block's forward is one `ops.moe` call, then the one all-reduce that sums the routed
and shared experts' partial outputs over tensor-parallel ranks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glm47.config import ModelConfig
from glm47.model.layers import MLP
from glm47.model.linear import FusedExperts
from glm47.model.parallel import SINGLE
from glm47.ops import REFERENCE, Ops, reference
from glm47.ops.reference import gemm_rows, routed_experts, select_experts  # noqa: F401 (re-exported)


class Router(nn.Module):
    """`mlp.gate`: weight [E, H] and e_score_correction_bias [E], replicated on every rank and kept in float32
    whatever the model's dtype (the router runs in float32 in the reference; the bias decides near-ties between
    experts, rounding it would change which experts run)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        E = config.n_routed_experts
        self.weight = nn.Parameter(torch.zeros(E, config.hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(E, dtype=torch.float32))
        self.top_k, self.n_group, self.topk_group = config.num_experts_per_tok, config.n_group, config.topk_group
        self.norm_topk_prob, self.scale = config.norm_topk_prob, config.routed_scaling_factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x (N, H) -> routing weights (N, K) float32, expert ids (N, K)."""
        return reference.route(x, self)


class MoE(nn.Module):
    ops: Ops = REFERENCE

    def __init__(self, config: ModelConfig, parallel=None, fmt=None):
        super().__init__()
        self.parallel = parallel or SINGLE
        self.gate = Router(config)
        self.experts = FusedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size,
                                    parallel, fmt)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts,
                                   parallel, fmt, reduce=False) if config.n_shared_experts > 0 else None)

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        y = self.ops.moe(x.reshape(-1, shape[-1]), self)
        return self.parallel.all_reduce(y).view(shape)
