"""Loss-free expert balancing (DeepSeek-V3, GLM-4.5): count how many tokens each MoE layer sends to each
expert, and after every step move the router's `e_score_correction_bias` up for under-loaded experts and
down for over-loaded ones by a fixed rate. The bias only changes which experts are picked, never the
weights, so balancing adds no term to the loss.

Counting uses a forward hook on each `Router` (`mlp.gate`, whose output is (weights, ids)); the model files
stay untouched. Backward passes run no forward hooks, so nothing is counted twice.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from glm47.model.moe import Router


def update_bias(bias: Tensor, load: Tensor, rate: float) -> Tensor:
    """The bias after one balancing step: bias + rate * sign(mean load - load). load: (E,) token counts."""
    return bias + rate * torch.sign(load.float().mean() - load.float())


def load_ratio(load: Tensor) -> Tensor:
    """max / mean expert load, per row of (..., E) counts (1.0 is perfectly balanced; 0 loads give 0)."""
    load = load.float()
    mean = load.mean(-1)
    return torch.where(mean > 0, load.amax(-1) / mean.clamp_min(1e-12), torch.zeros_like(mean))


class ExpertLoadTracker:
    """Counts routed tokens per (MoE layer, expert) while attached. `valid` (a (B, T) bool tensor, set by
    the caller before a forward) excludes padding; forwards of other sizes (e.g. decoding) count every token.

        tracker = ExpertLoadTracker(model)
        tracker.valid = batch.valid
        loss = ...; loss.backward(); opt.step()
        tracker.rebalance(rate=1e-3)   # nudge biases from this step's counts, then reset them
    """

    def __init__(self, model: nn.Module):
        self.routers: list[tuple[str, Router]] = [(name.removesuffix(".gate"), m) for name, m in model.named_modules()
                                                  if isinstance(m, Router)]
        E = self.routers[0][1].e_score_correction_bias.numel() if self.routers else 0
        self.counts = torch.zeros(len(self.routers), E, dtype=torch.long)
        self.valid: Tensor | None = None
        self.enabled = True  # False: forwards are not counted
        self._handles = [router.register_forward_hook(self._hook(i)) for i, (_, router) in enumerate(self.routers)]

    @property
    def names(self) -> list[str]:
        """The MoE layers, as module paths (e.g. "model.layers.3.mlp", "mtp.0.mlp")."""
        return [name for name, _ in self.routers]

    def _hook(self, index: int):
        def hook(module: nn.Module, args, output: tuple[Tensor, Tensor]) -> None:
            if not self.enabled:
                return
            ids = output[1]  # (N, K) expert ids of N = B*T tokens
            if self.valid is not None and self.valid.numel() == ids.shape[0]:
                ids = ids[self.valid.reshape(-1).to(ids.device)]
            self.counts[index] += torch.bincount(ids.reshape(-1).cpu(), minlength=self.counts.shape[1])
        return hook

    def ratios(self) -> Tensor:
        """max/mean load of each MoE layer over what was counted since the last reset, (layers,)."""
        return load_ratio(self.counts)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def rebalance(self, rate: float) -> None:
        """One balancing step on every router from the current counts, then reset the counts."""
        for (_, router), load in zip(self.routers, self.counts):
            if load.sum() > 0:
                router.e_score_correction_bias.copy_(update_bias(router.e_score_correction_bias, load, rate))
        self.reset()

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
