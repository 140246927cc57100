"""Conversations -> token ids + assistant loss mask -> padded batches, in a seeded order.

No packing: each row is one conversation at positions 0..L-1, right-padded with <|endoftext|> to the
longest row of its batch. Causal attention never lets a real token see the padding after it, so the model
runs with no attention mask, and RoPE positions are exactly those of inference. Rows are grouped by length
(sorted inside windows of 8 batches): ~9 % padding at the default corpus, while each batch still
mixes kinds of conversation (sorting whole epochs by length made batches one kind each, and the loss jumpy).
The batch for a step is a pure function of (seed, step): resuming needs nothing but the step.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glm47.chat import render_ids
from glm47.chat.tokenizer import Tokenizer

SORT_WINDOW = 8  # batches whose rows are sorted by length together: ~9 % padding, batches still mixed


@dataclass(slots=True)
class Batch:
    input_ids: Tensor  # (B, T) int64, padded with pad_id
    loss_mask: Tensor  # (B, T) bool: True where the token is written by the assistant (trained on)
    valid: Tensor  # (B, T) bool: True on real tokens, False on padding

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())


def encode_conversation(tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None,
                        enable_thinking: bool, clear_thinking: bool) -> tuple[list[int], list[bool]]:
    """(ids, mask) of a whole conversation ending in an assistant message. The renderer gives that final
    message no closing marker, so `<|user|>` (a stop id, as after every earlier assistant turn) is appended
    and trained on: the model learns to end its answer."""
    ids, mask = render_ids(tokenizer, messages, tools, enable_thinking=enable_thinking,
                           clear_thinking=clear_thinking, add_generation_prompt=False, return_assistant_mask=True)
    if messages and messages[-1]["role"] == "assistant":
        ids.append(tokenizer.token_to_id("<|user|>"))
        mask.append(True)
    return ids, mask


def encode_example(tokenizer: Tokenizer, example) -> tuple[list[int], list[bool]]:
    """A corpus Example (glm47.training.corpus) as (ids, mask)."""
    return encode_conversation(tokenizer, example.messages, example.tools, example.enable_thinking,
                               example.clear_thinking)


def collate(rows: Sequence[tuple[list[int], list[bool]]], pad_id: int, max_len: int | None = None) -> Batch:
    """Right-pads (ids, mask) rows to the longest (cut at max_len)."""
    rows = [(ids[:max_len], mask[:max_len]) for ids, mask in rows]
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    for b, (ids, mask) in enumerate(rows):
        input_ids[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        loss_mask[b, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
        valid[b, :len(ids)] = True
    return Batch(input_ids, loss_mask, valid)


class BatchSchedule:
    """Which rows form the batch of each step: every epoch is a seeded shuffle of all rows, cut into
    length-sorted batches whose order is shuffled again. Deterministic in (seed, step)."""

    def __init__(self, rows: Sequence[tuple[list[int], list[bool]]], batch_size: int, seed: int, pad_id: int,
                 max_len: int | None = None):
        if not rows:
            raise ValueError("no training rows")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.rows, self.batch_size, self.seed, self.pad_id, self.max_len = rows, batch_size, seed, pad_id, max_len
        self.batches_per_epoch = max(len(rows) // batch_size, 1)
        self._epoch, self._order = -1, []

    def _epoch_batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"batches:{self.seed}:{epoch}")
        order = list(range(len(self.rows)))
        rng.shuffle(order)
        order = order[: self.batches_per_epoch * self.batch_size] if len(order) >= self.batch_size else order
        batches = []
        window = SORT_WINDOW * self.batch_size
        for start in range(0, len(order), window):
            chunk = sorted(order[start:start + window], key=lambda i: len(self.rows[i][0]))
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def indices(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.batches_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._order = epoch, self._epoch_batches(epoch)
        return self._order[k]

    def batch(self, step: int) -> Batch:
        return collate([self.rows[i] for i in self.indices(step)], self.pad_id, self.max_len)
