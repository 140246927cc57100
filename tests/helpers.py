"""Test helpers: tiny random checkpoints written by transformers (the numerical reference)."""

from __future__ import annotations

from pathlib import Path

import torch

from glm47.config import ModelConfig


def hf_model(config: ModelConfig, seed: int = 0, std: float = 0.15):
    """A transformers Glm4MoeForCausalLM of `config` with every parameter random (biases, norms and the
    balancing bias included, which transformers initialises to constants), scaled so logits are O(1)."""
    import transformers

    hf_config = transformers.Glm4MoeConfig.from_dict(config.to_dict())
    torch.manual_seed(seed)
    model = transformers.Glm4MoeForCausalLM(hf_config).float().eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        biases = [(n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
        for name, t in list(model.named_parameters()) + biases:  # not inv_freq: rotary tables stay exact
            noise = torch.randn(t.shape, generator=g)
            if "norm" in name:
                t.copy_(1.0 + 0.2 * noise)
            elif name.endswith("e_score_correction_bias"):
                t.copy_(0.1 * noise)
            else:
                t.copy_(std * noise)
    return model


def save_hf_checkpoint(config: ModelConfig, directory: Path, seed: int = 0):
    model = hf_model(config, seed)
    model.save_pretrained(directory)
    return model
