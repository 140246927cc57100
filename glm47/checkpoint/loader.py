"""load_model(path): a checkpoint directory in the official layout -> Glm4MoeForCausalLM.

Builds the model on the meta device (with its parallel state and weight format), allocates it once on the
target device, checks every tensor's name, shape and dtype against the model's checkpoint entries before
reading any data, then loops over the checkpoint's keys shard by shard: each tensor is read straight into the
part of its parameter the layer names (a contiguous row slice is read alone), or handed to the layer's
weight_loader when it must be converted or cut. A checkpoint without MTP weights (as transformers writes
them) loads with the MTP layer disabled. The ops are chosen (and the CPU kernels built) before it returns.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from glm47.checkpoint.fp8 import IGNORED_SUFFIXES, dequantize, scale_key_of
from glm47.checkpoint.safetensors_io import DTYPES, TensorInfo, list_tensors, read_into
from glm47.config import ModelConfig
from glm47.model.glm4_moe import Glm4MoeForCausalLM
from glm47.model.linear import Entry
from glm47.model.memory import anon_huge_bytes, rehome
from glm47.model.parallel import ParallelState
from glm47.ops import select

log = logging.getLogger("glm47")
FLOAT_DTYPES = ("BF16", "F16", "F32")


def _parse_dtype(dtype: torch.dtype | str | None, config: ModelConfig) -> torch.dtype:
    if dtype is None:
        dtype = config.torch_dtype
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"dtype={dtype!r} is not supported; use bfloat16, float16 or float32")
    return dtype


def _report(problems: dict[str, list[str]], path: Path) -> None:
    lines = []
    for what, names in problems.items():
        if names:
            shown = ", ".join(names[:20]) + (f", … ({len(names) - 20} more)" if len(names) > 20 else "")
            lines.append(f"{what} ({len(names)}): {shown}")
    if lines:
        raise ValueError(f"checkpoint {path} does not match the model:\n  " + "\n  ".join(lines))


def load_model(path: str | Path, dtype: torch.dtype | str | None = torch.bfloat16,
               device: str | torch.device = "cpu", progress: bool | None = None,
               parallel: ParallelState | None = None) -> Glm4MoeForCausalLM:
    """Loads config.json and the safetensors weights of a checkpoint directory.

    dtype: activation/weight dtype (None: the config's torch_dtype); the router stays float32.
    progress: show a progress bar (default: when stderr is a terminal).
    parallel: this process's ranks; each layer loads only its shard (default: one process, everything)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"checkpoint directory {path} does not exist")
    config = ModelConfig.from_file(path)
    dtype = _parse_dtype(dtype, config)
    infos = list_tensors(path)

    N, n_mtp = config.num_hidden_layers, config.num_nextn_predict_layers
    mtp_prefixes = [f"model.layers.{N + j}." for j in range(n_mtp)]
    has_mtp = n_mtp > 0 and all(any(k.startswith(p) for k in infos) for p in mtp_prefixes)
    if n_mtp and not has_mtp:
        log.warning("%s has no MTP weights (model.layers.%d.*): MTP layer disabled", path, N)
    own_embed = f"model.layers.{N}.embed_tokens.weight" in infos
    own_head = f"model.layers.{N}.shared_head.head.weight" in infos

    with torch.device("meta"):
        model = Glm4MoeForCausalLM(config, mtp=has_mtp, mtp_own_embed=own_embed and has_mtp,
                                   mtp_own_head=own_head and has_mtp, parallel=parallel, fmt=dtype)
    model = model.to_empty(device=device)
    huge = rehome(model, copy=False) if torch.device(device).type == "cpu" else 0
    load_weights(model, infos, path, progress)
    if huge:
        got = anon_huge_bytes()
        log.info("weights on huge pages: %s of %.2f GB (GLM47_HUGE_PAGES=0 turns them off)",
                 "unknown" if got is None else f"{min(got, huge) / 1e9:.2f} GB", huge / 1e9)
    model.use_ops(select(device, dtype))
    return model.eval()


def load_weights(model: Glm4MoeForCausalLM, infos: dict[str, TensorInfo], path: Path,
                 progress: bool | None = None) -> int:
    """Checks, then reads every checkpoint tensor this rank keeps into the model. Returns the bytes read."""
    entries = model.checkpoint_entries()
    # FP8 weights come with a scale tensor; static activation scales are accepted and ignored.
    scales = {scale_key_of(k): infos[k] for k in infos if scale_key_of(k) in entries}
    extra = {s.name for s in scales.values()} | {k for k in infos if k.endswith(IGNORED_SUFFIXES)}
    problems: dict[str, list[str]] = {"missing tensors": sorted(entries.keys() - infos.keys()),
                                      "unexpected tensors": sorted(infos.keys() - entries.keys() - extra),
                                      "wrong shapes": [], "wrong dtypes": []}
    for name in sorted(entries.keys() & infos.keys()):
        info, want = infos[name], entries[name].shape
        if tuple(want) != info.shape:
            problems["wrong shapes"].append(f"{name} {list(info.shape)} (expected {list(want)})")
        fp8_ok = info.dtype.startswith("F8") and name in scales and len(info.shape) == 2
        if info.dtype not in FLOAT_DTYPES and not fp8_ok:
            hint = " — an FP8 weight needs a .weight_scale or .weight_scale_inv" if info.dtype.startswith("F8") else ""
            problems["wrong dtypes"].append(f"{name} {info.dtype} (expected one of {FLOAT_DTYPES}){hint}")
    _report(problems, path)

    by_file: dict[Path, list[TensorInfo]] = {}
    for info in infos.values():
        by_file.setdefault(info.file, []).append(info)
    if progress is None:
        progress = sys.stderr.isatty()
    total, read = sum(i.nbytes for i in infos.values()), 0
    with torch.no_grad(), tqdm(total=total, unit="B", unit_scale=True, desc="loading", disable=not progress) as bar:
        for file in sorted(by_file):  # one shard at a time, tensors in file order
            with open(file, "rb") as fh:
                for info in sorted(by_file[file], key=lambda i: i.offset):
                    entry = entries.get(info.name)
                    if entry is not None:
                        read += _load(entry, info, scales.get(info.name), fh)
                    bar.update(info.nbytes)
    return read


def _load(entry: Entry, info: TensorInfo, scale: TensorInfo | None, fh) -> int:
    """Reads checkpoint tensor `info` into its entry's place. Returns the bytes read (0: another rank's)."""
    target = entry.target()
    if target is None:
        return 0
    if scale is not None and info.dtype.startswith("F8"):
        entry.load(_read_fp8(info, scale, fh))
        return info.nbytes
    part = entry.source()
    if part is None:
        read_into(info, target, fh)
        return info.nbytes
    if part.dim == 0:  # a block of whole rows: contiguous bytes of the file
        row = info.nbytes // info.shape[0]
        rows = TensorInfo(info.name, info.file, info.dtype, (part.length, *info.shape[1:]),
                          info.offset + part.start * row, part.length * row)
        read_into(rows, target, fh)
        return rows.nbytes
    whole = torch.empty(info.shape, dtype=DTYPES[info.dtype])  # a column slice: strided, read whole and cut
    read_into(info, whole, fh)
    entry.load(whole)
    return info.nbytes


def _read_fp8(info: TensorInfo, scale: TensorInfo, fh) -> torch.Tensor:
    weight = torch.empty(info.shape, dtype=DTYPES[info.dtype])
    read_into(info, weight, fh)
    s = torch.empty(scale.shape, dtype=DTYPES[scale.dtype])
    with open(scale.file, "rb") as sf:  # the scale may sit in another shard; it is tiny
        read_into(scale, s, sf)
    try:
        return dequantize(weight, s)
    except ValueError as e:
        raise ValueError(f"{info.name}: {e}") from None
