import json
from dataclasses import fields
from pathlib import Path

import pytest

from glm47.config import PRESETS, ModelConfig, preset, resolve_config


def official_config_fields(reference: Path) -> dict:
    """The official config.json's keys that are ModelConfig fields (the architecture), with their values."""
    official = json.loads((reference / "config.json").read_text())
    return {key: value for key, value in official.items() if key in {f.name for f in fields(ModelConfig)}}


def test_glm47_preset_equals_official_config_field_by_field(golden, reference_or_none):
    official = golden("official_config_fields.json", official_config_fields)
    ours = preset("glm-4.7")
    if reference_or_none is not None:
        assert ours == ModelConfig.from_file(reference_or_none / "config.json")
    for key, value in official.items():
        assert getattr(ours, key) == value, (key, getattr(ours, key), value)
    assert len(official) >= 28, len(official)  # every architectural key is a field
    assert ours.rotary_dim == 64 and ours.head_dim == 128


def test_glm45_air_preset_has_published_shape():
    c = preset("glm-4.5-air")
    assert (c.num_hidden_layers, c.hidden_size, c.n_routed_experts, c.moe_intermediate_size) == (46, 4096, 128, 1408)
    assert (c.intermediate_size, c.first_k_dense_replace, c.use_qk_norm) == (10944, 1, False)
    assert (c.routed_scaling_factor, c.max_position_embeddings) == (1.0, 131072)


def test_reads_the_layout_transformers_5_writes():
    d = {"model_type": "glm4_moe", "vocab_size": 100, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "moe_intermediate_size": 16,
         "n_routed_experts": 4, "num_experts_per_tok": 2, "dtype": "float32", "extra_unknown_key": 1,
         "rope_parameters": {"rope_theta": 5000.0, "partial_rotary_factor": 0.25, "rope_type": "default"}}
    c = ModelConfig.from_dict(d)
    assert (c.rope_theta, c.partial_rotary_factor, c.torch_dtype) == (5000.0, 0.25, "float32")
    assert c.head_dim == 8 and c.rotary_dim == 2


def test_to_dict_roundtrips_through_from_dict():
    for name in PRESETS:
        c = preset(name)
        assert ModelConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c


@pytest.mark.parametrize("field, value, words", [
    ("num_key_value_heads", 3, "num_attention_heads=4"),
    ("num_experts_per_tok", 9, "num_experts_per_tok=9"),
    ("n_group", 3, "n_group=3"),
    ("topk_group", 3, "topk_group=3"),
    ("model_type", "llama", "model_type='llama'"),
    ("hidden_size", 0, "hidden_size=0"),
    ("partial_rotary_factor", 1.5, "partial_rotary_factor=1.5"),
    ("hidden_act", "gelu", "hidden_act='gelu'"),
    ("tie_word_embeddings", True, "tie_word_embeddings=True"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling="),
])
def test_invalid_config_raises_naming_field_and_value(field, value, words):
    with pytest.raises(ValueError) as e:
        preset("tiny", **{field: value})
    assert words in str(e.value)


def test_missing_required_key_is_named():
    d = preset("tiny").to_dict()
    del d["hidden_size"]
    with pytest.raises(ValueError, match="hidden_size"):
        ModelConfig.from_dict(d)


def test_resolve_config_rejects_unknown_name():
    with pytest.raises(ValueError, match="nope"):
        resolve_config("nope")
