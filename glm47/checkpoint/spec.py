"""The one table between official checkpoint keys and this model's parameters.

Our modules are named after the checkpoint, with three exceptions declared here: q/k/v projections are
fused into `qkv_proj`, gate/up projections into `gate_up_proj`, routed experts are stacked into
`experts.w13` / `experts.w2`, and the MTP layer `model.layers.{num_hidden_layers + j}` lives at `mtp.{j}`.
`tensor_view` gives the slice of our parameter that holds one checkpoint tensor: loading copies into it,
saving copies out of it, so both directions use the same table.
"""

from __future__ import annotations

import re

from torch import Tensor, nn

# (official key pattern, our parameter name, which part of it)
PACKED: list[tuple[re.Pattern, str, str]] = [
    (re.compile(r"^(.*)\.experts\.(\d+)\.(gate|up)_proj\.weight$"), r"\1.experts.w13", "expert_gate_up"),
    (re.compile(r"^(.*)\.experts\.(\d+)\.down_proj\.weight$"), r"\1.experts.w2", "expert_down"),
    (re.compile(r"^(.*)\.self_attn\.(q|k|v)_proj\.(weight|bias)$"), r"\1.self_attn.qkv_proj.\3", "qkv"),
    (re.compile(r"^(.*)\.(gate|up)_proj\.weight$"), r"\1.gate_up_proj.weight", "gate_up"),
]
_MTP_KEY = re.compile(r"^model\.layers\.(\d+)\.(.*)$")


def internal_name(key: str, num_hidden_layers: int) -> tuple[str, str | None, re.Match | None]:
    """Official key -> (our parameter/buffer name, packing kind or None, the pattern match)."""
    m = _MTP_KEY.match(key)
    if m and int(m.group(1)) >= num_hidden_layers:
        key = f"mtp.{int(m.group(1)) - num_hidden_layers}.{m.group(2)}"
    for pattern, target, kind in PACKED:
        match = pattern.match(key)
        if match:
            return match.expand(target), kind, match
    return key, None, None


def official_name(name: str, num_hidden_layers: int) -> str:
    """Our (unpacked) name -> official key: only the MTP prefix differs."""
    m = re.match(r"^mtp\.(\d+)\.(.*)$", name)
    return f"model.layers.{num_hidden_layers + int(m.group(1))}.{m.group(2)}" if m else name


def model_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Parameters and persistent buffers by name."""
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b is not None)
    return tensors


def tensor_view(tensors: dict[str, Tensor], key: str, model: nn.Module) -> Tensor:
    """The (contiguous) slice of our parameter that holds checkpoint tensor `key`. KeyError if none."""
    cfg = model.config
    name, kind, m = internal_name(key, cfg.num_hidden_layers)
    t = tensors[name]
    if kind is None:
        return t
    if kind == "qkv":
        q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        start, size = {"q": (0, q), "k": (q, kv), "v": (q + kv, kv)}[m.group(2)]
        return t.narrow(0, start, size)
    if kind == "gate_up":
        half = t.shape[0] // 2
        return t.narrow(0, 0 if m.group(2) == "gate" else half, half)
    expert = int(m.group(2))
    if expert >= t.shape[0]:
        raise KeyError(key)
    t = t[expert]
    if kind == "expert_gate_up":
        half = t.shape[0] // 2
        return t.narrow(0, 0 if m.group(3) == "gate" else half, half)
    return t  # expert_down


def official_keys(model: nn.Module) -> list[str]:
    """Every checkpoint key this model expects, in natural (layer-numeric) order."""
    cfg = model.config
    keys = []
    for name, t in model_tensors(model).items():
        prefix, _, leaf = name.rpartition(".")
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            base = name[: -len("qkv_proj." + leaf)]
            keys += [f"{base}{p}_proj.{leaf}" for p in "qkv"]
        elif name.endswith("gate_up_proj.weight"):
            base = name[: -len("gate_up_proj.weight")]
            keys += [f"{base}gate_proj.weight", f"{base}up_proj.weight"]
        elif leaf == "w13":
            keys += [f"{prefix}.{e}.{p}_proj.weight" for e in range(t.shape[0]) for p in ("gate", "up")]
        elif leaf == "w2":
            keys += [f"{prefix}.{e}.down_proj.weight" for e in range(t.shape[0])]
        else:
            keys.append(name)
    keys = [official_name(k, cfg.num_hidden_layers) for k in keys]
    return sorted(keys, key=_natural_key)


def _natural_key(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]
