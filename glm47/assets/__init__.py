"""The embedded default model: nano GLM-4.7, trained on this project's synthetic agent corpus by
`glm47 train` (see glm47/training/recipe.py). GLM-4.7's architecture at 13.8M parameters (MoE with a shared
expert and the balancing bias, qk-norm, partial RoPE, one MTP layer) with its own 2,048-token BPE vocabulary
carrying GLM-4.7's special tokens. It thinks, calls the built-in tools (glm47/tools) and answers with their
results; `glm47 generate`, `chat` and `serve` use it when no --model is given."""

from __future__ import annotations

from pathlib import Path

NANO_DIR = Path(__file__).parent / "nano-glm47"


def default_model_path() -> Path:
    """The embedded checkpoint's directory (config.json, generation_config.json, model.safetensors,
    tokenizer.json). Raises FileNotFoundError naming the file when the install lacks it."""
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (NANO_DIR / name).is_file():
            raise FileNotFoundError(f"the embedded default model is incomplete: {NANO_DIR / name} is missing "
                                    "(retrain it with `glm47 train --out glm47/assets/nano-glm47`)")
    return NANO_DIR
