"""Which parameter gets which optimizer, and the learning-rate schedule.

As GLM-4.5 was trained: Muon for every hidden weight matrix (attention q/k/v/o, dense and expert MLPs, the
shared expert, the router, the MTP eh_proj), AdamW for the word embedding, the LM head, RMSNorm weights and
biases. `adamw_only` puts everything on AdamW. Weight decay applies to matrices and embeddings, never to
norms or biases. The balancing bias is a buffer, not a parameter: balance.py moves it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from glm47.model.linear import WeightLayer
from glm47.training.muon import Muon

ADAMW_BETAS = (0.9, 0.95)


def _row_blocks(name: str, model: nn.Module) -> list[int] | None:
    """The separate matrices stacked in a fused parameter (q/k/v, gate/up), as its layer declares them, or None
    for one matrix."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    return module.row_blocks(leaf) if isinstance(module, WeightLayer) else None


def _is_embedding_or_head(name: str) -> bool:
    return "embed_tokens" in name or name.startswith("lm_head") or "shared_head.head" in name


def build_optimizers(model: nn.Module, lr: float, weight_decay: float,
                     adamw_only: bool = False) -> list[torch.optim.Optimizer]:
    """[Muon, AdamW] (or [AdamW] with adamw_only). Every trainable parameter is in exactly one group."""
    muon_groups: dict[tuple[int, ...] | None, list[nn.Parameter]] = {}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() < 2:
            no_decay.append(p)
        elif adamw_only or _is_embedding_or_head(name):
            decay.append(p)
        else:
            splits = _row_blocks(name, model)
            muon_groups.setdefault(tuple(splits) if splits else None, []).append(p)
    adamw = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                               {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=ADAMW_BETAS, eps=1e-8)
    if adamw_only:
        return [adamw]
    groups = [{"params": ps, "splits": list(s) if s else None} for s, ps in muon_groups.items()]
    return [Muon(groups, lr=lr, weight_decay=weight_decay), adamw]


def lr_at(step: int, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup over `warmup` steps to `peak`, then cosine down to peak * min_ratio at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min((step - warmup) / max(total - warmup, 1), 1.0)
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def set_lr(optimizers: list[torch.optim.Optimizer], lr: float) -> None:
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
