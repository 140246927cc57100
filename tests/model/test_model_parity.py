"""Logit parity with transformers' Glm4MoeForCausalLM, loading checkpoints that transformers saved."""

import pytest
import torch

from glm47 import load_model
from glm47.config import preset
from helpers import save_hf_checkpoint

CASES = {
    "dense-only": preset("tiny-dense"),
    "moe-n_group-2": preset("tiny"),
    "moe-4-groups-topk2-2-shared": preset("tiny", n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=3,
                                          n_shared_experts=2, num_hidden_layers=2),
    "mqa-no-qknorm-no-bias-no-norm_topk": preset("tiny-mqa"),
    "gqa-4-kv-heads-partial-0.25": preset("tiny", partial_rotary_factor=0.25, num_key_value_heads=4),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_logits_match_transformers(name, tmp_path):
    config = CASES[name]
    ref = save_hf_checkpoint(config, tmp_path)
    ours = load_model(tmp_path, dtype=torch.float32)
    assert not ours.has_mtp  # transformers writes no MTP weights
    ids = torch.randint(0, config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours.compute_logits(ours(ids))
    assert got.shape == (3, 17, config.vocab_size)
    assert expected.std() > 0.3, "logits too small for the comparison to mean anything"
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, f"{name}: max |dlogit| = {err:.3g}"


def test_bfloat16_logits_are_as_close_to_float32_as_transformers_own_bfloat16(tmp_path):
    """bfloat16 keeps 8 mantissa bits (relative step 2^-8 ≈ 0.4 %), and rounding happens at every layer, so
    an absolute 1e-4 bound is meaningless. The justified bound: our bf16 error against the float32
    reference is no worse than 1.5x the reference's own bf16 error (plus a small floor)."""
    config = preset("tiny")
    ref = save_hf_checkpoint(config, tmp_path)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = ref(ids).logits
        ref_bf16 = ref.to(torch.bfloat16)(ids).logits.float()
        model = load_model(tmp_path, dtype=torch.bfloat16)
        ours = model.compute_logits(model(ids)).float()
    err_ref = (ref_bf16 - exact).abs().max().item()
    err_ours = (ours - exact).abs().max().item()
    assert err_ours <= 1.5 * err_ref + 0.02, f"ours {err_ours:.3g} vs transformers bf16 {err_ref:.3g}"
    assert err_ours < 0.05 * exact.abs().max().item()
