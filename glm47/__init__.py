"""glm47: a readable, fast, from-scratch implementation of GLM-4.7 (model, prompt format, engine, serving)."""

from glm47.config import PRESETS, ModelConfig, preset

__version__ = "0.1.0"


def load_model(path, dtype="bfloat16", device="cpu", **kwargs):
    """Loads a checkpoint directory into a `Glm4MoeForCausalLM` (see glm47.checkpoint.loader.load_model)."""
    from glm47.checkpoint.loader import load_model as _load

    return _load(path, dtype=dtype, device=device, **kwargs)


__all__ = ["ModelConfig", "PRESETS", "preset", "load_model", "__version__"]
