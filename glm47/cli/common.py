"""What several `glm47` commands share: which checkpoint to load when --model is not given, and the engine
options they all take."""

from __future__ import annotations


def model_dir(model: str | None, alternatives: str = "--model") -> str:
    """--model, else the embedded default model's directory (a ValueError when none is installed, naming the
    command's own ways to give a model: `alternatives`)."""
    if model:
        return model
    missing = f"no {alternatives} given and no embedded default model is installed"
    try:
        from glm47.assets import default_model_path
    except ModuleNotFoundError as e:
        if e.name != "glm47.assets":  # a broken install, not a missing model: show it
            raise
        raise ValueError(missing) from None
    try:
        path = default_model_path()
    except FileNotFoundError as e:  # an install without the checkpoint files
        raise ValueError(f"{missing} ({e})") from None
    if not path.exists():
        raise ValueError(f"{missing} ({path} does not exist)")
    return str(path)


SPECULATIVE_HELP = ("draft this many tokens a step with the checkpoint's MTP layer (speculative decoding; the output "
                    "is the same, the speed higher when drafts are accepted; default 0 = off)")
