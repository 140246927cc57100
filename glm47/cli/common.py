"""What several `glm47` commands share: which checkpoint to load when --model is not given."""

from __future__ import annotations

NO_DEFAULT = "no --model or --url given and no embedded default model is installed"


def model_dir(model: str | None) -> str:
    """--model, else the embedded default model's directory (a ValueError when none is installed)."""
    if model:
        return model
    try:
        from glm47.assets import default_model_path
    except ModuleNotFoundError as e:
        if e.name != "glm47.assets":  # a broken install, not a missing model: show it
            raise
        raise ValueError(NO_DEFAULT) from None
    try:
        path = default_model_path()
    except FileNotFoundError as e:  # an install without the checkpoint files
        raise ValueError(f"{NO_DEFAULT} ({e})") from None
    if not path.exists():
        raise ValueError(f"{NO_DEFAULT} ({path} does not exist)")
    return str(path)
