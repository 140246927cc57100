"""The planner's arithmetic, checked against numbers derived another way: the checkpoint tensors of a
torch model built on the meta device (names and shapes as its layers declare them), published parameter
counts, the KV formula written out, and the official GLM-4.5/4.7 deployment table."""

import itertools
import re
import subprocess
import sys

import pytest

from glm47.config import preset
from glm47.planner import (GPUS, count_params, kv_bytes_per_token, plan, resolve_gpu, tensor_families,
                           weight_bytes, weight_bytes_per_gpu)

torch = pytest.importorskip("torch")

SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
                "first_k_dense_replace", "attention_bias", "use_qk_norm", "num_nextn_predict_layers")
_checkpoints: dict = {}


def checkpoint_shapes(name: str, mtp: bool = True) -> dict[str, tuple[int, ...]]:
    """Official checkpoint key -> shape, from our torch model built on the meta device (no memory)."""
    from glm47.checkpoint.writer import checkpoint_shapes as layer_shapes
    from glm47.model.glm4_moe import Glm4MoeForCausalLM

    c = preset(name)
    key = (tuple(getattr(c, f) for f in SHAPE_FIELDS), mtp)
    if key not in _checkpoints:
        with torch.device("meta"):
            model = Glm4MoeForCausalLM(c, mtp=mtp)
        _checkpoints[key] = layer_shapes(model)
    return _checkpoints[key]


def expand(name: str) -> list[str]:
    """'a.{0..2}.b' -> ['a.0.b', 'a.1.b', 'a.2.b'] (any number of ranges)."""
    parts = re.split(r"\{(\d+)\.\.(\d+)\}", name)
    fixed, ranges = parts[0::3], [range(int(a), int(b) + 1) for a, b in zip(parts[1::3], parts[2::3])]
    return ["".join(itertools.chain.from_iterable(zip(fixed, map(str, combo + ("",)))))
            for combo in itertools.product(*ranges)]


@pytest.mark.parametrize("name", ["tiny", "tiny-dense", "tiny-mqa", "bench", "glm-4.5-air", "glm-4.7", "glm-4.6",
                                  "glm-4.5"])
def test_tensor_inventory_equals_the_models_checkpoint_keys_and_shapes(name):
    ours = {}
    for f in tensor_families(preset(name)):
        names = expand(f.name)
        assert len(names) == f.count, f.name
        ours.update((n, f.shape) for n in names)
    assert ours == checkpoint_shapes(name)


@pytest.mark.parametrize("name", ["tiny", "glm-4.5-air", "glm-4.7"])
def test_total_params_equal_the_checkpoint_element_count_with_and_without_mtp(name):
    for mtp in (True, False):
        shapes = checkpoint_shapes(name, mtp)
        assert count_params(preset(name), mtp=mtp).total == sum(torch.Size(s).numel() for s in shapes.values())


def test_tiny_model_parameters_plus_router_bias_buffers_equal_the_count():
    from glm47.model.glm4_moe import Glm4MoeForCausalLM

    c = preset("tiny")
    model = Glm4MoeForCausalLM(c)
    params = sum(p.numel() for p in model.parameters())
    biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    assert count_params(c).total == params + biases
    # Active: every parameter of the main model except embedding, head and routed experts, plus k of E experts.
    main = {n: p.numel() for n, p in model.named_parameters() if not n.startswith("mtp.")}
    experts = sum(v for n, v in main.items() if n.endswith(("experts.w13", "experts.w2")))
    rest = sum(main.values()) - experts - main["model.embed_tokens.weight"] - main["lm_head.weight"]
    main_biases = sum(b.numel() for n, b in model.named_buffers()
                      if n.endswith("e_score_correction_bias") and not n.startswith("mtp."))
    assert count_params(c).active == rest + main_biases + experts * c.num_experts_per_tok // c.n_routed_experts


def test_glm45_matches_the_published_355b_total_and_32b_active():
    p = count_params(preset("glm-4.5"))
    assert abs(p.main - 355e9) / 355e9 < 0.01  # 352.80e9
    assert abs(p.active - 32e9) / 32e9 < 0.01  # 32.08e9
    assert p.total == p.main + p.mtp_params and 3.9e9 < p.mtp_params < 4.0e9  # one MoE layer + eh_proj
    air = count_params(preset("glm-4.5-air"))
    assert abs(air.main - 106e9) / 106e9 < 0.01 and abs(air.active - 12e9) / 12e9 < 0.02


def test_kv_per_token_of_glm47_in_bf16_is_92_layers_x_2_x_8_heads_x_128_x_2_bytes():
    c = preset("glm-4.7")
    assert kv_bytes_per_token(c, "bf16", mtp=False) == 92 * 2 * 8 * 128 * 2 == 376_832
    assert kv_bytes_per_token(c, "bf16", mtp=True) == 93 * 2 * 8 * 128 * 2  # + the MTP layer's own cache
    assert kv_bytes_per_token(c, "bf16", mtp=True) - kv_bytes_per_token(c, "bf16", mtp=False) == 4_096
    assert kv_bytes_per_token(c, "fp8", mtp=True) == 93 * 2 * 8 * 128


def test_bf16_weights_are_two_bytes_a_param_except_the_float32_router_bias():
    c = preset("glm-4.7")
    w = weight_bytes(tensor_families(c), "bf16")
    assert w.fp32_params == 90 * 160  # 89 MoE layers + the MTP layer
    assert w.total == 2 * count_params(c).total + 2 * w.fp32_params


def fp8_bytes_by_rule(key: str, shape: tuple[int, ...]) -> int:
    """The FP8 release by key name: FP8 + a float32 scale per output row for Linear weights ("*_proj.weight",
    except the MTP eh_proj); float32 router bias; BF16 for everything else."""
    n = torch.Size(shape).numel()
    if key.endswith("_proj.weight") and not key.endswith("eh_proj.weight"):
        return n + 4 * shape[0]
    return 4 * n if key.endswith("e_score_correction_bias") else 2 * n


@pytest.mark.parametrize("name", ["tiny", "glm-4.7"])
def test_fp8_bytes_follow_the_official_fp8_layout_rule_by_key_name(name):
    expected = sum(fp8_bytes_by_rule(k, s) for k, s in checkpoint_shapes(name).items())
    assert weight_bytes(tensor_families(preset(name)), "fp8").total == expected


@pytest.mark.parametrize("name", ["tiny", "glm-4.7"])
def test_weights_per_gpu_split_over_tp_except_replicated_norms_router_and_kv_heads(name):
    c = preset(name)
    replicated = kv = split = 0
    for key, shape in checkpoint_shapes(name).items():
        b = fp8_bytes_by_rule(key, shape)
        if key.endswith(("norm.weight", "mlp.gate.weight", "e_score_correction_bias", "eh_proj.weight")):
            replicated += b
        elif re.search(r"\.(k|v)_proj\.", key):
            kv += b  # split by KV head: at most num_key_value_heads ways
        else:
            split += b
    for tp in (1, 2, 4, 8, 16, 32):
        expected = split / tp + kv / min(tp, c.num_key_value_heads) + replicated
        assert weight_bytes_per_gpu(tensor_families(c), "fp8", tp, c.num_key_value_heads) == pytest.approx(expected)


def test_glm47_fp8_weights_are_about_half_of_bf16():
    fams = tensor_families(preset("glm-4.7"))
    fp8, bf16 = weight_bytes(fams, "fp8").total, weight_bytes(fams, "bf16").total
    assert 358e9 < fp8 < 360e9 and 713e9 < bf16 < 714e9  # 358.9 GB and 713.6 GB
    assert 0.50 < fp8 / bf16 < 0.51


@pytest.mark.parametrize("quant, gpu, gpus", [("fp8", "h200", 4), ("fp8", "h100", 8), ("bf16", "h200", 8),
                                              ("bf16", "h100", 16)])
def test_glm47_at_200k_context_needs_the_gpus_of_the_official_deployment_table(quant, gpu, gpus):
    p = plan("glm-4.7", gpu=gpu, quant=quant, context=200_000, batch=1)
    assert p.min_gpus == gpus
    assert p.max_context_at_min_gpus == 202_752  # the whole window fits for one sequence


def test_kv_cache_for_200k_tokens_in_bf16_is_76_gb():
    p = plan("glm-4.7", gpu="h200", quant="bf16", context=200_000, batch=1)
    assert p.kv_dtype == "bf16" and p.kv_cache_bytes == 93 * 2 * 8 * 128 * 2 * 200_000  # 76.2 GB
    assert plan("glm-4.7", gpu="h200", quant="fp8", context=200_000).kv_dtype == "fp8"  # auto follows weights
    assert plan("glm-4.7", gpu="h200", quant="fp8", context=200_000, kv_dtype="bf16").kv_cache_bytes == \
        p.kv_cache_bytes


def test_more_context_or_batch_never_needs_fewer_gpus():
    never = 10**9
    for quant, gpu in [("fp8", "h100"), ("bf16", "h200"), ("fp8", "rtx4090")]:
        needs = [plan("glm-4.7", gpu=gpu, quant=quant, context=ctx, batch=8).min_gpus or never
                 for ctx in (1, 1000, 8192, 32768, 65536, 131072, 202752)]
        assert needs == sorted(needs), (quant, gpu, needs)
        needs = [plan("glm-4.7", gpu=gpu, quant=quant, context=32768, batch=b).min_gpus or never
                 for b in (1, 2, 8, 32, 128, 512)]
        assert needs == sorted(needs), (quant, gpu, needs)
    assert plan("glm-4.7", gpu="h100", quant="fp8", context=32768, batch=512).min_gpus is None  # past 32 GPUs


def test_largest_context_is_exactly_the_edge_of_fitting():
    p = plan("glm-4.7", gpu="h100", quant="fp8", context=1000, batch=16)
    edge = p.max_context_at_min_gpus
    assert edge < 202_752  # below the model's cap, so the edge is the memory's
    assert plan("glm-4.7", gpu="h100", quant="fp8", context=edge, batch=16).min_gpus == p.min_gpus
    assert plan("glm-4.7", gpu="h100", quant="fp8", context=edge + 1, batch=16).min_gpus > p.min_gpus
    assert p.max_context_at_next_gpus > edge


def test_kv_heads_replicate_past_eight_gpus_so_kv_per_gpu_stops_shrinking():
    p = plan("glm-4.7", gpu="h100", quant="bf16", context=100_000, batch=1)
    kv = {o.gpus: o.kv_per_gpu for o in p.options}
    assert kv[8] == kv[16] == kv[32] == pytest.approx(p.kv_cache_bytes / 8)
    assert kv[4] == pytest.approx(p.kv_cache_bytes / 4)
    assert [o.gpus for o in p.options] == [1, 2, 4, 8, 16, 32]  # 64 does not divide 96 heads


def test_no_mtp_drops_its_layer_from_weights_and_kv():
    on = plan("glm-4.7", gpu="h200", quant="fp8", context=100_000)
    off = plan("glm-4.7", gpu="h200", quant="fp8", context=100_000, mtp=False)
    assert on.params.total - off.params.total == on.params.mtp_params > 0
    assert on.params.active == off.params.active  # active is the main model's either way
    assert on.kv_bytes_per_token - off.kv_bytes_per_token == 2 * 8 * 128
    assert off.kv_layers == 92 and on.kv_layers == 93


def test_custom_gpu_is_its_size_in_decimal_gb():
    assert resolve_gpu("custom:96").memory_gb == 96 == GPUS["h20"].memory_gb
    assert resolve_gpu("H200").memory_gb == 141
    a = plan("glm-4.7", gpu="custom:141", quant="fp8", context=50_000, batch=4).to_json()
    b = plan("glm-4.7", gpu="h200", quant="fp8", context=50_000, batch=4).to_json()
    assert (a["min_gpus"], a["max_context_at_min_gpus"]) == (b["min_gpus"], b["max_context_at_min_gpus"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu="h1000"), "unknown GPU 'h1000'"),
    (dict(gpu="custom:lots"), "custom:GB"),
    (dict(gpu="custom:-8"), "positive"),
    (dict(model="glm-9"), "neither a preset"),
    (dict(context=0), "context must be a positive"),
    (dict(context=-5), "context must be a positive"),
    (dict(batch=0), "batch must be a positive"),
    (dict(context=202_753), "exceeds the model's maximum of 202,752"),
    (dict(quant="int4"), "unknown weight format 'int4'"),
    (dict(kv_dtype="fp4"), "unknown KV cache dtype 'fp4'"),
    (dict(mem_fraction=0), "mem_fraction"),
    (dict(mem_fraction=1.5), "mem_fraction"),
])
def test_bad_input_is_a_clear_value_error(kwargs, message):
    args = dict(model="glm-4.7", gpu="h100", quant="fp8", context=1000, batch=1) | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        plan(**args)


def test_glm45_maximum_context_is_128k():
    with pytest.raises(ValueError, match="131,072"):
        plan("glm-4.5", gpu="h200", quant="fp8", context=200_000)


def test_planner_imports_no_torch():
    code = "import sys, glm47.planner; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
