"""The ops dispatch, on every CPU (no kernels needed: where a test needs them to exist, fakes that run the torch
twin stand in): which implementation glm47.ops.select picks and when it reads GLM47_KERNELS and builds the
kernels, where ops/cpu.py falls back to the twin per call, and that a model loaded from a checkpoint has its
ops (and its kernels) before its first forward."""

import logging

import pytest
import torch
import torch.nn.functional as F

from glm47 import kernels, ops
from glm47.checkpoint.loader import load_model
from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset
from glm47.model.glm4_moe import Glm4MoeForCausalLM
from glm47.model.linear import ColumnLinear
from glm47.ops import CPU_BF16, REFERENCE, reference


class FakeKernels:
    """Stands in for the built extension (the ops call glm47.kernels' wrappers, which the fixture replaces)."""


def _qk_norm_rope(qkv, H, Hkv, D, q_norm, k_norm, eps, cos, sin):
    q, k, _ = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q, k = q.unflatten(-1, (H, D)), k.unflatten(-1, (Hkv, D))
    if q_norm is not None:
        q, k = reference.rms_norm_math(q, q_norm, eps), reference.rms_norm_math(k, k_norm, eps)
    return reference.apply_rope(q, cos, sin), reference.apply_rope(k, cos, sin)


def _route(x, weight, bias, top_k, n_group, topk_group, norm_topk_prob, scale):
    return reference.select_experts(F.linear(x.float(), weight), bias, top_k, n_group, topk_group, norm_topk_prob,
                                    scale)


def _routed_experts(x, w13, w2, weights, ids, shared_w13=None, shared_w2=None, first=None):
    y = reference.routed_experts(x, w13, w2, weights, ids, first)
    if shared_w13 is not None:
        gate, up = F.linear(x, shared_w13).chunk(2, dim=-1)
        y = y + F.linear(F.silu(gate) * up, shared_w2)
    return y


def _rms_norm(x, w, eps, add=None):
    if add is None:
        return reference.rms_norm_math(x, w, eps)
    return x + add, reference.rms_norm_math(x + add, w, eps)


@pytest.fixture
def fake_build(monkeypatch):
    """kernels.extension() succeeds (counted), and every kernel wrapper a forward without a KV cache uses runs a
    torch stand-in and is counted."""
    calls = {"build": 0}

    def extension():
        calls["build"] += 1
        return FakeKernels()

    monkeypatch.setattr(kernels, "extension", extension)
    for name, fn in {"linear": lambda x, w, b=None: F.linear(x, w, b), "rms_norm": _rms_norm,
                     "qk_norm_rope": _qk_norm_rope, "route": _route, "routed_experts": _routed_experts}.items():
        calls[name] = 0

        def counted(*args, name=name, fn=fn, **kw):
            calls[name] += 1
            return fn(*args, **kw)

        monkeypatch.setattr(kernels, name, counted)
    monkeypatch.delenv("GLM47_KERNELS", raising=False)
    return calls


def test_select_picks_the_kernels_only_for_bf16_on_a_cpu_with_them(fake_build, monkeypatch):
    assert ops.select("cpu", torch.bfloat16) is CPU_BF16
    assert ops.select("cpu", torch.float32) is REFERENCE
    assert ops.select("cpu", torch.float16) is REFERENCE
    assert ops.select("meta", torch.bfloat16) is REFERENCE
    monkeypatch.setattr(kernels, "extension", lambda: None)  # no AVX512-BF16, or the build failed
    assert ops.select("cpu", torch.bfloat16) is REFERENCE


def test_glm47_kernels_0_selects_the_torch_twins_without_building(fake_build, monkeypatch):
    monkeypatch.setenv("GLM47_KERNELS", "0")
    assert ops.select("cpu", torch.bfloat16) is REFERENCE
    assert fake_build["build"] == 0


def test_every_op_of_the_reference_table_is_a_named_twin_in_ops_reference():
    for name in ops.Ops.__dataclass_fields__:
        if name != "name":
            fn = getattr(REFERENCE, name)
            assert fn is getattr(reference, name), name
            assert getattr(CPU_BF16, name).__module__ == "glm47.ops.cpu"


def test_a_model_gets_its_ops_when_built_and_never_reads_the_switch_again(fake_build, monkeypatch):
    model = Glm4MoeForCausalLM(preset("tiny"), mtp=False, fmt=torch.bfloat16)
    assert model.ops is CPU_BF16 and fake_build["build"] == 1
    assert all(m.ops is CPU_BF16 for m in model.modules() if isinstance(getattr(type(m), "ops", None), ops.Ops))
    monkeypatch.setenv("GLM47_KERNELS", "0")  # too late: read once, when the model was built
    with torch.inference_mode():
        assert model.compute_logits(model(torch.tensor([[1, 2, 3]]))).isfinite().all()
    assert all(fake_build[k] > 0 for k in ("linear", "rms_norm", "qk_norm_rope", "route", "routed_experts"))
    assert fake_build["build"] == 1, "the kernels were looked up inside a forward"
    fp32 = Glm4MoeForCausalLM(preset("tiny"), mtp=False)
    assert fp32.ops is REFERENCE


def test_load_model_builds_the_kernels_before_it_returns(fake_build, tmp_path):
    init_checkpoint(preset("tiny"), tmp_path, seed=0)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.ops is CPU_BF16 and fake_build["build"] == 1
    assert load_model(tmp_path, dtype=torch.float32).ops is REFERENCE


def test_cpu_ops_fall_back_to_the_twin_per_call(fake_build):
    """Too many rows, float32 or a tensor autograd must see: the twin runs, bit for bit; a few bf16 rows: the
    kernel."""
    layer = ColumnLinear(40, 24, fmt=torch.bfloat16).requires_grad_(False)
    torch.nn.init.normal_(layer.weight)
    x = torch.randn(3, 40).bfloat16()
    CPU_BF16.linear(x, layer)
    assert fake_build["linear"] == 1, "a 3-row bf16 linear should take the kernel"
    big = torch.randn(kernels.LINEAR_MAX_ROWS + 1, 40).bfloat16()
    assert torch.equal(CPU_BF16.linear(big, layer), F.linear(big, layer.weight))
    layer.requires_grad_(True)
    y = CPU_BF16.linear(x, layer)
    assert y.requires_grad and torch.equal(y, F.linear(x, layer.weight))
    with torch.no_grad():
        CPU_BF16.linear(x, layer)  # nothing to differentiate: the kernel again
    assert fake_build["linear"] == 2
    fp32 = ColumnLinear(40, 24, fmt=torch.float32)
    assert torch.equal(CPU_BF16.linear(x.float(), fp32), F.linear(x.float(), fp32.weight))
    assert fake_build["linear"] == 2


def test_takes_only_few_bf16_cpu_rows_without_autograd():
    w = torch.randn(8, 32).bfloat16()
    x = torch.randn(4, 32).bfloat16()
    assert ops.cpu.takes(x, w, max_rows=4)
    assert not ops.cpu.takes(torch.randn(5, 32).bfloat16(), w, max_rows=4)  # too many rows
    assert not ops.cpu.takes(x.float(), w.float(), max_rows=4)  # float32
    assert not ops.cpu.takes(x, w.requires_grad_(), max_rows=4)  # autograd would need a backward
    with torch.no_grad():
        assert ops.cpu.takes(x, w, max_rows=4)


def test_a_failed_build_warns_once_and_returns_none(monkeypatch, caplog):
    import torch.utils.cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("error: command 'c++' failed: No such file or directory")

    monkeypatch.setattr(kernels, "cpu_has_avx512_bf16", lambda: True)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", no_compiler)
    with caplog.at_level(logging.WARNING, logger="glm47.kernels"):
        assert kernels.extension.__wrapped__() is None
    assert len(caplog.records) == 1 and "using torch instead" in caplog.records[0].getMessage()
