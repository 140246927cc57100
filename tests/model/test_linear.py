"""The weight-bearing layers (glm47/model/linear.py): at world size 1 their entries are the official checkpoint,
each tensor landing on its own slice of one parameter; at a fake world size 2 or 4 (a ParallelState with no
process group: layers only size and load their shard) each rank loads exactly its shard of an official-layout
checkpoint, reads only those bytes where they are contiguous, and the planner's split table agrees with what
the layers hold."""

import itertools
import re

import pytest
import torch

from glm47.checkpoint.loader import load_model
from glm47.checkpoint.safetensors_io import list_tensors
from glm47.config import preset
from glm47.model.glm4_moe import Glm4MoeForCausalLM
from glm47.model.linear import WeightLayer
from glm47.model.parallel import ParallelState, check_tp
from glm47.planner import tensor_families
from glm47.planner.params import REPLICATED, SPLIT_KV, SPLIT_TP


@pytest.fixture(scope="module")
def whole(tiny_fp32):
    return load_model(tiny_fp32, dtype=torch.float32)


def test_every_parameter_element_is_filled_by_exactly_one_checkpoint_tensor():
    model = Glm4MoeForCausalLM(preset("tiny"), fmt=torch.float32)
    seen = {name: torch.zeros_like(t, dtype=torch.int32) for name, t in model.state_dict(keep_vars=True).items()}
    owner = {id(t): name for name, t in model.state_dict(keep_vars=True).items()}
    for entry in model.checkpoint_entries().values():
        target = entry.target()
        base = target if target._base is None else target._base
        name = owner[id(getattr(entry.module, entry.param))]
        assert base.data_ptr() == getattr(entry.module, entry.param).data_ptr()
        view = seen[name].view(-1)
        offset = (target.data_ptr() - base.data_ptr()) // target.element_size()
        idx = torch.as_strided(torch.arange(view.numel()), target.shape, target.stride(), offset)
        view[idx.reshape(-1)] += 1
    assert all(bool((s == 1).all()) for s in seen.values()), [n for n, s in seen.items() if not (s == 1).all()]


def shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return full.chunk(size, dim)[rank]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_of_two_loads_its_shard_of_every_layer(tiny_fp32, whole, rank):
    part = load_model(tiny_fp32, dtype=torch.float32, parallel=ParallelState(tp_rank=rank, tp_size=2))
    c = preset("tiny")
    D, H, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    for i, (a, w) in enumerate(zip(part.model.layers, whole.model.layers)):
        q, k, v = w.self_attn.qkv_proj.weight.split([H * D, Hkv * D, Hkv * D])
        want = torch.cat([shard(q, 0, rank, 2), shard(k, 0, rank, 2), shard(v, 0, rank, 2)])
        assert torch.equal(a.self_attn.qkv_proj.weight, want)
        assert a.self_attn.num_heads == H // 2 and a.self_attn.num_kv_heads == Hkv // 2
        assert torch.equal(a.self_attn.o_proj.weight, shard(w.self_attn.o_proj.weight, 1, rank, 2))
        assert torch.equal(a.input_layernorm.weight, w.input_layernorm.weight)  # replicated
        mlp_a, mlp_w = (a.mlp.shared_experts, w.mlp.shared_experts) if i >= c.first_k_dense_replace else (a.mlp, w.mlp)
        gate, up = mlp_w.gate_up_proj.weight.chunk(2)
        assert torch.equal(mlp_a.gate_up_proj.weight, torch.cat([shard(gate, 0, rank, 2), shard(up, 0, rank, 2)]))
        assert torch.equal(mlp_a.down_proj.weight, shard(mlp_w.down_proj.weight, 1, rank, 2))
        if i >= c.first_k_dense_replace:
            gate, up = w.mlp.experts.w13.chunk(2, dim=1)
            assert torch.equal(a.mlp.experts.w13, torch.cat([shard(gate, 1, rank, 2), shard(up, 1, rank, 2)], 1))
            assert torch.equal(a.mlp.experts.w2, shard(w.mlp.experts.w2, 2, rank, 2))
            assert torch.equal(a.mlp.gate.weight, w.mlp.gate.weight)
            assert torch.equal(a.mlp.gate.e_score_correction_bias, w.mlp.gate.e_score_correction_bias)
    assert torch.equal(part.model.embed_tokens.weight, shard(whole.model.embed_tokens.weight, 0, rank, 2))
    assert torch.equal(part.lm_head.weight, shard(whole.lm_head.weight, 0, rank, 2))
    assert torch.equal(part.mtp[0].eh_proj.weight, whole.mtp[0].eh_proj.weight)  # replicated


def test_kv_heads_replicate_when_tp_exceeds_them(tiny_fp32, whole):
    """tiny has 2 KV heads: at tp=4 rank r keeps KV head r // 2 and one of the 4 query heads."""
    c = preset("tiny")
    D, H, Hkv = c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q, k, v = whole.model.layers[0].self_attn.qkv_proj.weight.split([H * D, Hkv * D, Hkv * D])
    for rank in range(4):
        with torch.device("meta"):
            part = Glm4MoeForCausalLM(c, parallel=ParallelState(tp_rank=rank, tp_size=4), fmt=torch.float32)
        part = part.to_empty(device="cpu")
        attn = part.model.layers[0].self_attn.qkv_proj
        for e in part.checkpoint_entries().values():
            if e.module is attn and e.param == "weight":
                e.load({0: q, 1: k, 2: v}[e.shard])
        head = rank // 2
        assert torch.equal(attn.weight, torch.cat([q[rank * D:(rank + 1) * D], k[head * D:(head + 1) * D],
                                                   v[head * D:(head + 1) * D]]))


def test_expert_parallel_ranks_load_only_their_experts_and_read_fewer_bytes(tiny_fp32, whole):
    from glm47.checkpoint.loader import load_weights

    c = preset("tiny")
    infos = list_tensors(tiny_fp32)
    total = sum(i.nbytes for i in infos.values())
    read = []
    for rank in range(2):
        state = ParallelState(tp_rank=rank, tp_size=2, ep_rank=rank, ep_size=2)
        with torch.device("meta"):
            part = Glm4MoeForCausalLM(c, parallel=state, fmt=torch.float32)
        part = part.to_empty(device="cpu")
        read.append(load_weights(part, infos, tiny_fp32))
        E = c.n_routed_experts // 2
        for a, w in zip(part.model.layers[1:], whole.model.layers[1:]):
            assert torch.equal(a.mlp.experts.w13, w.mlp.experts.w13[rank * E:(rank + 1) * E])  # whole experts
            assert torch.equal(a.mlp.experts.w2, w.mlp.experts.w2[rank * E:(rank + 1) * E])
    # Each rank reads half the experts and half of every row-split tensor: well under the whole checkpoint.
    assert all(r < 0.75 * total for r in read), (read, total)


def test_invalid_tp_sizes_are_refused_naming_what_does_not_split_and_the_valid_ones():
    with pytest.raises(ValueError, match=r"tp_size=3 does not split 4 attention heads, 512 vocabulary rows, .*"
                                         r"2 KV heads; valid sizes: 1, 2, 4$"):
        with torch.device("meta"):
            Glm4MoeForCausalLM(preset("tiny"), parallel=ParallelState(tp_rank=0, tp_size=3))
    with pytest.raises(ValueError, match="valid sizes: 1, 2, 4, 8, 16, 32$"):  # GLM-4.7: 96 heads, 8 KV heads
        check_tp(preset("glm-4.7"), 6)
    with pytest.raises(ValueError, match="tp_rank=2"):
        ParallelState(tp_rank=2, tp_size=2)


def expand(name: str) -> list[str]:
    """'a.{0..2}.b' -> ['a.0.b', 'a.1.b', 'a.2.b'] (any number of ranges)."""
    parts = re.split(r"\{(\d+)\.\.(\d+)\}", name)
    fixed, ranges = parts[0::3], [range(int(a), int(b) + 1) for a, b in zip(parts[1::3], parts[2::3])]
    return ["".join(itertools.chain.from_iterable(zip(fixed, map(str, combo + ("",)))))
            for combo in itertools.product(*ranges)]


@pytest.mark.parametrize("name, tps", [("tiny", (1, 2, 4)), ("glm-4.7", (1, 4, 16))])
def test_the_planners_split_table_is_what_the_layers_hold(name, tps):
    """For every checkpoint tensor, the share a rank holds (from the layers, built on the meta device at that tp
    size) is 1/tp for the planner's 'tp' split, 1/min(tp, kv heads) for 'kv', all of it for 'replicated'."""
    c = preset(name)
    split_of = {}
    for f in tensor_families(c):
        for key in expand(f.name):
            split_of[key] = f.split
    share = {SPLIT_TP: lambda tp: tp, SPLIT_KV: lambda tp: min(tp, c.num_key_value_heads), REPLICATED: lambda tp: 1}
    for tp in tps:
        with torch.device("meta"):
            model = Glm4MoeForCausalLM(c, parallel=ParallelState(tp_rank=tp - 1, tp_size=tp))
        entries = model.checkpoint_entries()
        assert entries.keys() == split_of.keys()
        for key, e in entries.items():
            full = torch.Size(e.shape).numel()
            assert e.target().numel() * share[split_of[key]](tp) == full, (key, tp, split_of[key])
        assert isinstance(model.lm_head, WeightLayer)
