"""Writing checkpoints in the official layout: `save_checkpoint(model, dir)` for a model in memory and
`init_checkpoint(config, dir, seed)` for a random one of any size, generated tensor by tensor (a
358B preset never exists in memory at once: only the shard being written does).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from glm47.config import ModelConfig
from glm47.model.glm4_moe import Glm4MoeForCausalLM

DEFAULT_SHARD_BYTES = 5 * 10**9  # what transformers writes by default


def _natural_key(key: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", key)]


def checkpoint_shapes(model: Glm4MoeForCausalLM) -> dict[str, tuple[int, ...]]:
    """Every key of the model's official checkpoint and its shape, as the layers name them, in natural
    (layer-numeric) order."""
    entries = model.checkpoint_entries()
    return {k: entries[k].shape for k in sorted(entries, key=_natural_key)}


def _fp32_key(key: str) -> bool:
    return key.endswith("e_score_correction_bias")  # float32 in the official checkpoints


def _write_shards(keys: list[str], shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                  make: Callable[[str], torch.Tensor], directory: Path, max_shard_bytes: int | None) -> list[str]:
    """Packs keys into shards in order, materialising one shard at a time. Returns the file names."""
    def nbytes(k: str) -> int:
        return torch.Size(shapes[k]).numel() * (4 if _fp32_key(k) else dtype.itemsize)

    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        if groups[-1] and max_shard_bytes and size + nbytes(k) > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += nbytes(k)
    n = len(groups)
    names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for fname, group in zip(names, groups):
        shard = {}
        for k in group:
            t = make(k)
            shard[k] = t.to(torch.float32 if _fp32_key(k) else dtype).contiguous()
            weight_map[k] = fname
        save_file(shard, str(directory / fname), metadata={"format": "pt"})
        del shard
    if n > 1:
        total = sum(nbytes(k) for k in keys)
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_generation_config(config: ModelConfig, directory: Path) -> None:
    """As the official one: the stop ids, pad id and temperature 1.0."""
    gen = {"_from_model_config": True, "eos_token_id": config.eos_token_id, "pad_token_id": config.pad_token_id,
           "temperature": 1.0}
    (directory / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def save_checkpoint(model: Glm4MoeForCausalLM, directory: str | Path, dtype: torch.dtype | None = None,
                    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES) -> None:
    """Writes config.json, generation_config.json and the weights of `model` in the official layout."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if model.parallel.tp_size > 1 or model.parallel.ep_size > 1:
        raise ValueError("save_checkpoint writes a whole model; this one holds one rank's shard")
    entries = model.checkpoint_entries()
    shapes = checkpoint_shapes(model)
    dtype = dtype or model.fmt.dtype
    _write_shards(list(shapes), shapes, dtype, lambda k: entries[k].target().detach().cpu(), directory,
                  max_shard_bytes)
    config = model.config.replace(torch_dtype=str(dtype).removeprefix("torch."))
    config.save(directory)
    write_generation_config(config, directory)


def random_tensor(key: str, shape: tuple[int, ...], seed: int, std: float) -> torch.Tensor:
    """Deterministic per (seed, key), independent of sharding and order. Norm weights are drawn around 1,
    everything else (matrices, biases, the balancing bias) around 0, so that every path is exercised."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    t = torch.randn(shape, generator=g) * std
    if "norm" in key.rsplit(".", 2)[-2]:  # input_layernorm, q_norm, enorm, shared_head.norm, model.norm, ...
        t += 1.0
    return t


def init_checkpoint(config: ModelConfig, directory: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                    max_shard_bytes: int | None = DEFAULT_SHARD_BYTES, mtp: bool = True,
                    std: float | None = None) -> list[str]:
    """Writes a random checkpoint of `config` (official layout, config.json + generation_config.json).
    Returns the weight file names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config, mtp=mtp)
    if not mtp:
        config = config.replace(num_nextn_predict_layers=0)
    shapes = checkpoint_shapes(model)
    std = config.initializer_range if std is None else std
    names = _write_shards(list(shapes), shapes, dtype, lambda k: random_tensor(k, shapes[k], seed, std), directory,
                          max_shard_bytes)
    config.replace(torch_dtype=str(dtype).removeprefix("torch.")).save(directory)
    write_generation_config(config, directory)
    return names


def iter_checkpoint_keys(config: ModelConfig, mtp: bool = True) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(key, shape) of every tensor an official checkpoint of `config` holds."""
    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config, mtp=mtp)
    yield from checkpoint_shapes(model).items()
