"""GPU memory as sold, in decimal GB, and whether the GPU has FP8 tensor cores.

Only memory sizes from the vendors' spec sheets are listed. B200 is 180 GB as NVIDIA sells it in HGX/DGX B200
(1,440 GB per 8 GPUs), though the package carries 192 GB. `custom:GB` covers anything else.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class GPU:
    name: str
    memory_gb: float
    fp8: bool  # FP8 tensor cores (Ada, Hopper, Blackwell, CDNA3); without them engines run FP8 weight-only


GPUS: dict[str, GPU] = {g.name: g for g in [
    GPU("h100", 80, True),
    GPU("h100-nvl", 94, True),
    GPU("h800", 80, True),
    GPU("h200", 141, True),
    GPU("h20", 96, True),
    GPU("b200", 180, True),
    GPU("a100-80g", 80, False),
    GPU("a100-40g", 40, False),
    GPU("l40s", 48, True),
    GPU("rtx4090", 24, True),
    GPU("rtx5090", 32, True),
    GPU("rtx-pro-6000", 96, True),
    GPU("mi300x", 192, True),
    GPU("mi325x", 256, True),
]}


def resolve_gpu(spec: str) -> GPU:
    """A name from GPUS (case-insensitive) or `custom:GB`, e.g. custom:96."""
    key = spec.strip().lower()
    if key.startswith("custom:"):
        text = key.removeprefix("custom:")
        try:
            gb = float(text)
        except ValueError:
            raise ValueError(f"--gpu {spec!r}: expected custom:GB with GB a number, e.g. custom:96") from None
        if not gb > 0 or gb == float("inf"):
            raise ValueError(f"--gpu {spec!r}: memory must be a positive number of GB")
        return GPU(f"custom:{text}", gb, True)
    if key not in GPUS:
        raise ValueError(f"unknown GPU {spec!r}; known: {', '.join(GPUS)}, or custom:GB")
    return GPUS[key]
