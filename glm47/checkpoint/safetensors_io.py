"""Reading safetensors checkpoints tensor by tensor with bounded memory.

`safetensors.safe_open` memory-maps a whole file, and every page it touches stays in the process's
resident set until the file is closed: loading a single-file checkpoint that way peaks at twice the model.
We parse the (documented, 8-byte length + JSON) header and `readinto` each tensor straight into its
destination, so the page cache is never mapped and the peak stays at the model plus one tensor. Writing
uses the safetensors library.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    file: Path
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path.name} is not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ValueError(f"{path.name} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path.name} has a corrupt safetensors header: {e}") from None
    base = 8 + n
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        out[name] = TensorInfo(name, path, meta["dtype"], tuple(meta["shape"]), base + begin, end - begin)
    return out


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory (from the index when sharded). Pickle is refused."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ValueError(f"{index.name} lists shard files that do not exist: {missing}")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(f"refusing to load pickle files {pickles} (they can run arbitrary code); "
                         "convert the checkpoint to safetensors")
    raise ValueError(f"no model.safetensors or model.safetensors.index.json in {directory}")


def list_tensors(directory: Path) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for f in weight_files(directory):
        for name, info in read_header(f).items():
            if name in tensors:
                raise ValueError(f"tensor {name} appears in both {tensors[name].file.name} and {f.name}")
            tensors[name] = info
    return tensors


def read_into(info: TensorInfo, out: torch.Tensor, fh) -> None:
    """Copies tensor `info` from open file `fh` into `out` (same shape; any dtype/device)."""
    src_dtype = DTYPES[info.dtype]
    direct = out.device.type == "cpu" and out.dtype == src_dtype and out.is_contiguous()
    buf = out if direct else torch.empty(info.shape, dtype=src_dtype)
    fh.seek(info.offset)
    view = memoryview(buf.view(-1).view(torch.uint8).numpy()) if buf.numel() else memoryview(b"")
    if fh.readinto(view) != info.nbytes:
        raise ValueError(f"tensor {info.name}: {info.file.name} is truncated")
    if not direct:
        out.copy_(buf)
