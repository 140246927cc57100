"""Who holds which part of the model: the tensor- and expert-parallel ranks and sizes of this process.

Every weight-bearing layer (model/linear.py) is built with a ParallelState and sizes its shard from it: at
size 1 a layer holds the whole tensor. The collectives are methods here so that each one is visible at its call
site in a forward (RowLinear's all-reduce, the vocab-parallel embedding's); at size 1 they return their input.
A state with a size above 1 and no process group sizes and loads shards but cannot run a forward: that is what
tests use to check sharding without starting processes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True, slots=True)
class ParallelState:
    tp_rank: int = 0
    tp_size: int = 1
    ep_rank: int = 0  # expert parallel: this rank's block of experts (ep_size 1: all of them)
    ep_size: int = 1
    tp_group: Any = None  # a torch.distributed process group, None in one process

    def __post_init__(self):
        for rank, size, what in ((self.tp_rank, self.tp_size, "tp"), (self.ep_rank, self.ep_size, "ep")):
            if size < 1 or not 0 <= rank < size:
                raise ValueError(f"{what}_rank={rank} is not a rank of {what}_size={size}")

    def split(self, n: int, what: str) -> tuple[int, int]:
        """(start, length) of this tp rank's equal share of n rows of `what`; n must divide evenly."""
        if n % self.tp_size:
            raise ValueError(f"{what}: {n} does not split over tp_size={self.tp_size}")
        size = n // self.tp_size
        return self.tp_rank * size, size

    def expert_range(self, num_experts: int) -> tuple[int, int]:
        """(first, count) of the experts this rank runs: a contiguous block under expert parallelism."""
        if num_experts % self.ep_size:
            raise ValueError(f"{num_experts} experts do not split over ep_size={self.ep_size}")
        count = num_experts // self.ep_size
        return self.ep_rank * count, count

    @classmethod
    def from_distributed(cls, expert_parallel: bool = False) -> ParallelState:
        """This process's place in an initialised torch.distributed world: tensor parallel over all its ranks, and
        with expert_parallel each rank also runs its own block of experts (EP = TP)."""
        rank, size = dist.get_rank(), dist.get_world_size()
        return cls(rank, size, rank if expert_parallel else 0, size if expert_parallel else 1, dist.group.WORLD)

    def _group(self):
        if self.tp_group is None:
            raise RuntimeError("a ParallelState without a process group can size and load shards, not run them")
        return self.tp_group

    def all_gather(self, x: Tensor, dim: int = -1) -> Tensor:
        """The tp ranks' x concatenated along `dim`, in rank order (x at size 1)."""
        if self.tp_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.tp_size)]
        dist.all_gather(parts, x.contiguous(), group=self._group())
        return torch.cat(parts, dim=dim)

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum of x over the tp ranks (x at size 1)."""
        if self.tp_size == 1:
            return x
        dist.all_reduce(x, group=self._group())
        return x


SINGLE = ParallelState()


def tp_splits(config, tp: int) -> list[str]:
    """What a tensor-parallel size of `tp` cannot split evenly for this model config (empty: tp is valid). Heads
    split by rank; KV heads split, or are replicated when tp is a multiple of them; the vocabulary and every MLP
    width split by rank."""
    c = config
    problems = [f"{n} {what}" for n, what in [
        (c.num_attention_heads, "attention heads"), (c.vocab_size, "vocabulary rows"),
        (c.intermediate_size, "dense MLP width"), (c.moe_intermediate_size, "expert width"),
        (c.moe_intermediate_size * c.n_shared_experts, "shared expert width")] if n and n % tp]
    kv = c.num_key_value_heads
    if (kv % tp) if tp <= kv else (tp % kv):
        problems.append(f"{kv} KV heads")
    return problems


def check_tp(config, tp: int) -> None:
    """Refuses a tensor-parallel size the model cannot be split over, listing the sizes it can."""
    problems = tp_splits(config, tp)
    if problems:
        valid = [n for n in range(1, 257) if not tp_splits(config, n)]
        raise ValueError(f"tp_size={tp} does not split {', '.join(problems)}; valid sizes: "
                         f"{', '.join(map(str, valid))}")
