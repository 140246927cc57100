"""The weight-bearing layers: each knows its shape, its shard, its storage format and its checkpoint names.

    ColumnLinear        rows (outputs) split over tp ranks
    ReplicatedLinear    the whole matrix on every rank                 the MTP eh_proj
    QKVLinear           [q; k; v] rows by head, KV heads replicated    self_attn.qkv_proj
    MergedColumnLinear  [gate; up] rows, each half split               gate_up_proj
    RowLinear           columns (inputs) split, all-reduce after       o_proj, down_proj
    FusedExperts        experts stacked, a contiguous block per rank   mlp.experts
    VocabEmbedding      vocabulary rows split, masked lookup           embed_tokens
    LMHead              a ColumnLinear over the vocabulary             lm_head, shared_head.head

A layer is built with a ParallelState (its ranks and sizes) and a WeightFormat (its storage), allocates only its
shard, and answers the loader, the writer and the optimiser:
    entries(prefix, names)     the official checkpoint keys it holds, with their full shapes and shard ids
    load_target(param, shard)  the slice of its own parameter one checkpoint tensor fills (None: another rank's)
    source_slice(param, shard) which part of that checkpoint tensor this rank keeps: (dim, start, length) or None
    weight_loader(param, loaded, shard)   copies a checkpoint tensor (or the slice of it) into place
    row_blocks(param)          the separate matrices stacked in a fused parameter (Muon orthogonalises each)
Its forward is one call into the ops table (`self.ops`, chosen by glm47.ops.select once per model), and a
RowLinear's all-reduce is written in its forward. Norms, the router and its bias are replicated plain parameters:
they keep their checkpoint names and need none of this.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from glm47.model.parallel import SINGLE, ParallelState
from glm47.ops import REFERENCE, Ops


@dataclass(frozen=True, slots=True)
class WeightFormat:
    """How a layer stores its weights. A plain format keeps them in the compute dtype: bf16 for the official
    checkpoints (what load_model asks for), float32 when nothing is said (training, parity tests), as torch's
    own modules. An 8-bit format will add its scales here."""
    dtype: torch.dtype = torch.float32

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "f16", torch.float32: "f32"}.get(self.dtype, str(self.dtype))

    @classmethod
    def of(cls, fmt: WeightFormat | torch.dtype | None) -> WeightFormat:
        return fmt if isinstance(fmt, WeightFormat) else cls() if fmt is None else cls(fmt)


@dataclass(frozen=True, slots=True)
class Slice:
    """Part of a checkpoint tensor: `length` indices from `start` along `dim`."""
    dim: int
    start: int
    length: int


@dataclass(frozen=True, slots=True)
class Entry:
    """One official checkpoint tensor and where it lives in this model."""
    key: str
    module: nn.Module
    param: str  # parameter or buffer name on `module`
    shard: Any  # which block of a fused parameter (None: the whole parameter)
    shape: tuple[int, ...]  # the checkpoint tensor's full shape

    def target(self) -> Tensor | None:
        if isinstance(self.module, WeightLayer):
            return self.module.load_target(self.param, self.shard)
        return getattr(self.module, self.param)

    def source(self) -> Slice | None:
        return self.module.source_slice(self.param, self.shard) if isinstance(self.module, WeightLayer) else None

    @torch.no_grad()
    def load(self, loaded: Tensor) -> None:
        """Copies the checkpoint tensor (whole) into this rank's part of the parameter."""
        if isinstance(self.module, WeightLayer):
            self.module.weight_loader(self.param, loaded, self.shard)
        else:
            getattr(self.module, self.param).copy_(loaded)


class WeightLayer(nn.Module):
    """A layer that owns weights: it sizes and allocates its shard and answers the loader, the writer and the
    optimiser (see the module docstring). Subclasses fill in entries, load_target and source_slice."""
    ops: Ops = REFERENCE  # model.use_ops sets the model's choice on every layer

    def __init__(self, parallel: ParallelState | None, fmt: WeightFormat | torch.dtype | None):
        super().__init__()
        self.parallel = parallel or SINGLE
        self.fmt = WeightFormat.of(fmt)

    def _param(self, *shape: int) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, dtype=self.fmt.dtype))  # zeros, not garbage, until loaded

    def entries(self, prefix: str, names: tuple[str, ...] | None = None) -> Iterator[tuple[str, str, Any, tuple]]:
        """(official key, parameter, shard id, full shape) of each checkpoint tensor. `names`: the official
        sibling module names of a fused parameter's blocks (from the model's packed_modules table)."""
        raise NotImplementedError

    def load_target(self, param: str, shard: Any) -> Tensor | None:
        raise NotImplementedError

    def source_slice(self, param: str, shard: Any) -> Slice | None:
        raise NotImplementedError

    def row_blocks(self, param: str) -> list[int] | None:
        return None

    @torch.no_grad()
    def weight_loader(self, param: str, loaded: Tensor, shard: Any = None) -> None:
        target = self.load_target(param, shard)
        if target is None:
            return
        s = self.source_slice(param, shard)
        target.copy_(loaded if s is None else loaded.narrow(s.dim, s.start, s.length))


def _whole_or(s: Slice, full: int) -> Slice | None:
    return None if s.start == 0 and s.length == full else s


class _Linear(WeightLayer):
    """y = x W^T (+ b) with W this rank's [out_local, in_local]."""

    def __init__(self, in_local: int, out_local: int, bias: bool, parallel, fmt):
        super().__init__(parallel, fmt)
        self.in_features, self.out_features = in_local, out_local
        self.weight = self._param(out_local, in_local)
        self.bias = self._param(out_local) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return self.ops.linear(x, self)

    def entries(self, prefix, names=None):  # one checkpoint matrix (and bias) of shape [full_out, full_in]
        yield f"{prefix}.weight", "weight", None, (self.full_out, self.full_in)
        if self.bias is not None:
            yield f"{prefix}.bias", "bias", None, (self.full_out,)

    def load_target(self, param, shard):
        return getattr(self, param)


class ColumnLinear(_Linear):
    """Output rows split over the tp ranks (each rank computes its slice of y; no communication)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel=None, fmt=None):
        parallel = parallel or SINGLE
        self.full_in, self.full_out = in_features, out_features
        self.row_start, rows = parallel.split(out_features, "output rows")
        super().__init__(in_features, rows, bias, parallel, fmt)

    def source_slice(self, param, shard):
        return _whole_or(Slice(0, self.row_start, self.out_features), self.full_out)


class ReplicatedLinear(ColumnLinear):
    """The whole matrix on every rank (the MTP layer's eh_proj)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, fmt=None):
        super().__init__(in_features, out_features, bias, SINGLE, fmt)


class LMHead(ColumnLinear):
    """The vocabulary projection: rows (token ids) split over the tp ranks. Each rank computes its ids' logits and
    the forward gathers them, in rank order, into the whole vocabulary's."""

    def __init__(self, hidden_size: int, vocab_size: int, parallel=None, fmt=None):
        super().__init__(hidden_size, vocab_size, bias=False, parallel=parallel, fmt=fmt)

    def forward(self, x: Tensor) -> Tensor:
        return self.parallel.all_gather(self.ops.linear(x, self), dim=-1)


class RowLinear(_Linear):
    """Input columns split over the tp ranks: each rank's product is a partial sum, all-reduced in the forward
    (reduce=False leaves that to the caller, which sums several partials first: the MoE's shared expert)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, parallel=None, fmt=None,
                 reduce: bool = True):
        parallel = parallel or SINGLE
        if bias and parallel.tp_size > 1:
            raise ValueError("a row-parallel linear with a bias is not supported over several ranks")
        self.full_in, self.full_out, self.reduce = in_features, out_features, reduce
        self.col_start, cols = parallel.split(in_features, "input columns")
        super().__init__(cols, out_features, bias, parallel, fmt)

    def forward(self, x: Tensor) -> Tensor:
        y = self.ops.linear(x, self)
        return self.parallel.all_reduce(y) if self.reduce else y

    def source_slice(self, param, shard):
        return _whole_or(Slice(1, self.col_start, self.in_features), self.full_in) if param == "weight" else None


class MergedColumnLinear(_Linear):
    """Several column-parallel matrices stacked into one ([gate; up]): each block split over the ranks on its own,
    so a rank holds [its gate rows; its up rows]."""

    def __init__(self, in_features: int, sizes: list[int], bias: bool = False, parallel=None, fmt=None):
        parallel = parallel or SINGLE
        self.full_in, self.full_sizes = in_features, list(sizes)
        self.starts, self.sizes = zip(*(parallel.split(n, "output rows") for n in sizes))
        super().__init__(in_features, sum(self.sizes), bias, parallel, fmt)

    def entries(self, prefix, names=None):
        parent = prefix.rpartition(".")[0]
        for i, name in enumerate(names):
            yield f"{parent}.{name}.weight", "weight", i, (self.full_sizes[i], self.full_in)
            if self.bias is not None:
                yield f"{parent}.{name}.bias", "bias", i, (self.full_sizes[i],)

    def load_target(self, param, shard):
        return getattr(self, param).narrow(0, sum(self.sizes[:shard]), self.sizes[shard])

    def source_slice(self, param, shard):
        return _whole_or(Slice(0, self.starts[shard], self.sizes[shard]), self.full_sizes[shard])

    def row_blocks(self, param):
        return list(self.sizes) if param == "weight" else None


class QKVLinear(MergedColumnLinear):
    """[q; k; v] split by attention head. With more tp ranks than KV heads each rank keeps one KV head, which
    tp / num_kv_heads ranks share (rank r holds KV head r // replicas); otherwise num_kv_heads / tp each."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, bias: bool,
                 parallel=None, fmt=None):
        parallel = parallel or SINGLE
        tp, r = parallel.tp_size, parallel.tp_rank
        if num_heads % tp or (tp > num_kv_heads and tp % num_kv_heads) or (tp <= num_kv_heads and num_kv_heads % tp):
            raise ValueError(f"tp_size={tp} does not divide {num_heads} attention heads and {num_kv_heads} KV heads")
        self.num_heads, self.head_dim = num_heads // tp, head_dim
        if tp > num_kv_heads:
            self.num_kv_heads, kv_first = 1, r // (tp // num_kv_heads)
        else:
            self.num_kv_heads = num_kv_heads // tp
            kv_first = r * self.num_kv_heads
        q_rows, kv_rows = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.full_in = hidden_size
        self.full_sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        self.sizes = (q_rows, kv_rows, kv_rows)
        self.starts = (r * q_rows, kv_first * head_dim, kv_first * head_dim)
        _Linear.__init__(self, hidden_size, sum(self.sizes), bias, parallel, fmt)


class FusedExperts(WeightLayer):
    """The routed experts, stacked: w13[e] = [gate_proj; up_proj] of expert e, w2[e] = its down_proj. Under
    expert parallelism (ep_size > 1) a rank holds a contiguous block of whole experts; otherwise every rank holds
    all experts with their intermediate size split over the tp ranks."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, parallel=None, fmt=None):
        super().__init__(parallel, fmt)
        p = self.parallel
        self.num_experts, self.hidden_size, self.full_inter = num_experts, hidden_size, intermediate_size
        self.first_expert, self.num_local = p.expert_range(num_experts)
        self.inter_start, self.intermediate_size = ((0, intermediate_size) if p.ep_size > 1
                                                    else p.split(intermediate_size, "expert intermediate size"))
        self.w13 = self._param(self.num_local, 2 * self.intermediate_size, hidden_size)
        self.w2 = self._param(self.num_local, hidden_size, self.intermediate_size)

    @property
    def local_first(self) -> int | None:
        """The first expert this rank holds under expert parallelism; None when it holds them all."""
        return None if self.num_local == self.num_experts else self.first_expert

    def entries(self, prefix, names=None):
        H, I = self.hidden_size, self.full_inter
        for e in range(self.num_experts):
            yield f"{prefix}.{e}.gate_proj.weight", "w13", (e, 0), (I, H)
            yield f"{prefix}.{e}.up_proj.weight", "w13", (e, 1), (I, H)
            yield f"{prefix}.{e}.down_proj.weight", "w2", (e, None), (H, I)

    def load_target(self, param, shard):
        e, half = shard
        local = e - self.first_expert
        if not 0 <= local < self.num_local:
            return None  # another rank's expert
        t = getattr(self, param)[local]
        return t if half is None else t.narrow(0, half * self.intermediate_size, self.intermediate_size)

    def source_slice(self, param, shard):
        s = Slice(1 if param == "w2" else 0, self.inter_start, self.intermediate_size)
        return _whole_or(s, self.full_inter)

    def row_blocks(self, param):
        return [self.intermediate_size] * 2 if param == "w13" else None


class VocabEmbedding(WeightLayer):
    """Token embeddings with the vocabulary rows split over the tp ranks: a rank looks up the ids it holds, zeros
    for the others, and the all-reduce assembles the rows."""

    def __init__(self, vocab_size: int, hidden_size: int, parallel=None, fmt=None):
        super().__init__(parallel, fmt)
        self.full_vocab = vocab_size
        self.row_start, self.num_rows = self.parallel.split(vocab_size, "vocabulary")
        self.weight = self._param(self.num_rows, hidden_size)

    def forward(self, ids: Tensor) -> Tensor:
        if self.parallel.tp_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.row_start
        outside = (local < 0) | (local >= self.num_rows)
        x = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        return self.parallel.all_reduce(x)

    def entries(self, prefix, names=None):
        yield f"{prefix}.weight", "weight", None, (self.full_vocab, self.weight.shape[1])

    def load_target(self, param, shard):
        return self.weight

    def source_slice(self, param, shard):
        return _whole_or(Slice(0, self.row_start, self.num_rows), self.full_vocab)


def checkpoint_entries(model: nn.Module, packed_modules: dict[str, tuple[str, ...]],
                       official_name=lambda name: name) -> dict[str, Entry]:
    """Every official checkpoint tensor of `model`, by key. Weight layers name theirs (a fused layer's names come
    from `packed_modules`: our module name -> the official names of its blocks); any other module's parameters
    and persistent buffers keep their own names. `official_name` maps one of our names to the checkpoint's."""
    entries: dict[str, Entry] = {}
    for name, module in model.named_modules():
        if isinstance(module, WeightLayer):
            found = module.entries(name, packed_modules.get(name.rpartition(".")[2]))
        else:
            tensors = [(n, t) for n, t in module.named_parameters(recurse=False) if t is not None]
            tensors += [(n, b) for n, b in module.named_buffers(recurse=False)
                        if b is not None and n not in module._non_persistent_buffers_set]
            found = ((f"{name}.{n}" if name else n, n, None, tuple(t.shape)) for n, t in tensors)
        for key, param, shard, shape in found:
            key = official_name(key)
            entries[key] = Entry(key, module, param, shard, shape)
    return entries
