"""The training objective: next-token loss on assistant tokens, plus the MTP loss of the MTP layer.

Position i of the main model predicts t_{i+1}; the MTP layer at i takes the main model's final-normed
hidden h_i and the token t_{i+1} and predicts t_{i+2}. Both are counted only where the predicted token is
an assistant token (the loss mask), so the MTP targets are the main targets shifted by one more.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE = -100


def shifted_targets(input_ids: Tensor, loss_mask: Tensor, shift: int) -> Tensor:
    """(B, T) -> (B, T): targets[:, i] = input_ids[:, i + shift] where loss_mask[:, i + shift], else IGNORE
    (also for the last `shift` positions, which have nothing to predict)."""
    assert shift >= 1, shift
    targets = torch.full_like(input_ids, IGNORE)
    future = input_ids[:, shift:]
    targets[:, :-shift] = torch.where(loss_mask[:, shift:], future, torch.full_like(future, IGNORE))
    return targets


@dataclass(slots=True)
class LossParts:
    loss: Tensor  # lm + mtp_weight * mtp: what backward() is called on
    lm: Tensor  # mean cross-entropy of the main head over its target tokens
    mtp: Tensor  # mean cross-entropy of the MTP draft (0 without an MTP layer)
    lm_tokens: int
    mtp_tokens: int


def _cross_entropy(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    n = int((targets != IGNORE).sum())
    if n == 0:
        return logits.sum() * 0.0, 0  # keeps the graph (and every parameter's grad) defined
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE), n


def training_loss(model, input_ids: Tensor, loss_mask: Tensor, mtp_weight: float = 0.3) -> LossParts:
    """Forward of `model` (Glm4MoeForCausalLM) on right-padded rows and the combined loss. Padding needs no
    attention mask: it only ever follows a row's real tokens, and its loss_mask is False."""
    hidden = model(input_ids)  # (B, T, H)
    logits = model.compute_logits(hidden)  # (B, T, V)
    lm, lm_n = _cross_entropy(logits, shifted_targets(input_ids, loss_mask, 1))
    if not model.has_mtp or mtp_weight == 0:
        zero = lm.detach() * 0.0
        return LossParts(lm, lm, zero, lm_n, 0)
    # The MTP input at i is t_{i+1}; the last position has none, and its target is ignored anyway.
    next_ids = torch.cat([input_ids[:, 1:], input_ids[:, -1:]], dim=1)
    draft_logits = model.compute_logits(model.mtp_forward(hidden, next_ids), mtp_layer=0)
    mtp, mtp_n = _cross_entropy(draft_logits, shifted_targets(input_ids, loss_mask, 2))
    return LossParts(lm + mtp_weight * mtp, lm, mtp, lm_n, mtp_n)
