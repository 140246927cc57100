"""Whether an output starts inside the reasoning. The chat template ends the prompt with
<|assistant|><think> when thinking is on and <|assistant|></think> when it is off; only the rendered
prompt knows which (a request may switch thinking per turn), so callers ask it, not the request flags."""

from __future__ import annotations

from glm47.parsers.markers import THINK_OPEN


def prompt_ends_in_think(prompt_text: str) -> bool:
    """True when generation continues right after an opened <think>: pass it as `thinking=`."""
    return prompt_text.rstrip().endswith(THINK_OPEN)
