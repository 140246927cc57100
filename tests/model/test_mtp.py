import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm47 import load_model
from glm47.checkpoint.writer import init_checkpoint
from glm47.config import preset
from glm47.model.kv_cache import KVCache


def test_mtp_layer_loads_from_layer_num_hidden_layers(tiny_fp32):
    keys = load_file(tiny_fp32 / "model.safetensors").keys()
    assert "model.layers.3.eh_proj.weight" in keys and "model.layers.3.mlp.experts.7.up_proj.weight" in keys
    model = load_model(tiny_fp32, dtype=torch.float32)
    assert model.has_mtp
    assert model.mtp[0].embed_tokens is None and model.mtp[0].shared_head.head is None  # shared with main
    w = load_file(tiny_fp32 / "model.safetensors")["model.layers.3.enorm.weight"]
    assert torch.equal(model.mtp[0].enorm.weight, w)


def mtp_logits(model, hidden, next_ids, positions=None, cache=None):
    return model.compute_logits(model.mtp_forward(hidden, next_ids, positions, cache), mtp_layer=0)


def test_mtp_forward_shapes_and_draft_for_i_plus_2(tiny_fp32):
    model = load_model(tiny_fp32, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model(ids)
        logits = model.compute_logits(hidden)
        out = model.mtp_forward(hidden[:, :-1], ids[:, 1:])
        draft = model.compute_logits(out, mtp_layer=0)
    assert logits.shape == (2, 10, 512) and hidden.shape == (2, 10, 64)
    assert draft.shape == (2, 9, 512) and out.shape == (2, 9, 64)
    assert model.num_kv_layers == 4  # the 3 decoder layers, then the MTP layer


def test_mtp_uses_embedding_and_hidden_in_the_right_slots(tiny_fp32):
    """eh_proj sees cat[enorm(embed(next)), hnorm(hidden)]. With eh_proj reading only the first half, the
    draft must depend on the next tokens and not on the hidden state; zeroing enorm then removes the token
    dependence too. Swapping enorm/hnorm or flipping the concat order breaks one of these."""
    model = load_model(tiny_fp32, dtype=torch.float32)
    mtp = model.mtp[0]
    h = model.config.hidden_size
    ids = torch.randint(0, 512, (1, 6), generator=torch.Generator().manual_seed(1))
    other_ids = (ids + 1) % 512
    hidden = torch.randn(1, 6, h)
    other_hidden = torch.randn(1, 6, h)
    with torch.no_grad():
        mtp.eh_proj.weight[:, h:] = 0  # keep only the embedding half
        a = mtp_logits(model, hidden, ids)
        assert torch.allclose(a, mtp_logits(model, other_hidden, ids), atol=1e-6)
        assert not torch.allclose(a, mtp_logits(model, hidden, other_ids), atol=1e-3)
        mtp.enorm.weight.zero_()
        assert torch.allclose(mtp_logits(model, hidden, ids), mtp_logits(model, hidden, other_ids), atol=1e-6)


def test_mtp_with_own_embedding_and_head_copies(tiny_fp32, tmp_path):
    """GLM-4.5 stores embed_tokens and shared_head.head under the MTP layer; they must be used."""
    tensors = load_file(tiny_fp32 / "model.safetensors")
    g = torch.Generator().manual_seed(5)
    tensors["model.layers.3.embed_tokens.weight"] = torch.randn(512, 64, generator=g)
    tensors["model.layers.3.shared_head.head.weight"] = torch.randn(512, 64, generator=g)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "config.json").write_text((tiny_fp32 / "config.json").read_text())
    own = load_model(tmp_path, dtype=torch.float32)
    shared = load_model(tiny_fp32, dtype=torch.float32)
    assert torch.equal(own.mtp[0].embed_tokens.weight, tensors["model.layers.3.embed_tokens.weight"])
    ids = torch.randint(0, 512, (1, 5), generator=g)
    with torch.no_grad():
        hidden = shared(ids)
        d_own, d_shared = mtp_logits(own, hidden, ids), mtp_logits(shared, hidden, ids)
        # Reproduce the own-copy draft by hand with the copies as the "main" embedding and head.
        shared.model.embed_tokens.weight.copy_(tensors["model.layers.3.embed_tokens.weight"])
        shared.lm_head.weight.copy_(tensors["model.layers.3.shared_head.head.weight"])
        assert torch.allclose(d_own, mtp_logits(shared, hidden, ids), atol=1e-5)
    assert not torch.allclose(d_own, d_shared, atol=1e-3)


def test_mtp_with_kv_cache_matches_full_forward(tiny_fp32):
    model = load_model(tiny_fp32, dtype=torch.float32)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        hidden = model(ids)
        full = mtp_logits(model, hidden[:, :-1], ids[:, 1:])
        cache = KVCache.for_model(model.config, 1, 16)
        steps = [mtp_logits(model, hidden[:, t:t + 1], ids[:, t + 1:t + 2], torch.tensor([[t]]), cache)
                 for t in range(8)]
    assert (torch.cat(steps, 1) - full).abs().max() < 1e-5


def test_checkpoint_without_mtp_weights_disables_mtp_and_says_so(tmp_path, caplog):
    init_checkpoint(preset("tiny"), tmp_path, mtp=False)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1  # as transformers writes: the config says 1, no weights
    (tmp_path / "config.json").write_text(json.dumps(config))
    with caplog.at_level("WARNING", logger="glm47"):
        model = load_model(tmp_path)
    assert not model.has_mtp and model.num_kv_layers == 3
    assert "no MTP weights" in caplog.text and "model.layers.3" in caplog.text
    with pytest.raises(ValueError, match="no MTP layer"):
        model.mtp_forward(torch.zeros(1, 1, 64), torch.zeros(1, 1, dtype=torch.long))
