"""Reading safetensors checkpoints (single files and sharded sets) with errors a user can act on.

Headers are parsed here rather than trusted to the safetensors library so that an empty, truncated
or foreign file gets one clear message naming the file. Tensors are read one at a time and handed
to the placement module, which copies them into fresh aligned storage: nothing keeps a view of the
memory-mapped file (safetensors aligns tensors to 8 bytes only).
"""
from __future__ import annotations

import glob
import json
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Sequence

import torch

from .key_layouts import detect_layout, to_original

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
_SHARD = re.compile(r"^(.*)-(\d{5})-of-(\d{5})\.safetensors$")
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint file cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class TensorInfo:
    file: str
    key: str  # key as stored in the file
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header: tensor table and the `__metadata__` strings."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: file not found")
    if not path.endswith(".safetensors"):
        raise CheckpointError(f"{name}: not a .safetensors file (only safetensors checkpoints are read)")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{name}: the file is empty (0 bytes); the download is probably incomplete")
    if size < 8:
        raise CheckpointError(f"{name}: truncated ({size} bytes); not a complete safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise CheckpointError(f"{name}: header claims {header_len} bytes but the file has {size}; "
                                  "the file is truncated or not safetensors")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{name}: unreadable safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + header_len
    tensors = {}
    for key, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (int(v) for v in entry["data_offsets"])
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{name}: malformed header entry for tensor {key!r}: {entry}") from None
        if base + end > size:
            raise CheckpointError(f"{name}: truncated: tensor {key!r} needs bytes up to {base + end} "
                                  f"but the file has {size}")
        expected = dtype.itemsize * _numel(shape)
        if end - begin != expected:
            raise CheckpointError(f"{name}: tensor {key!r} holds {end - begin} bytes, expected "
                                  f"{expected} for shape {list(shape)} {entry['dtype']}")
        tensors[key] = TensorInfo(path, key, dtype, shape, base + begin, end - begin)
    return tensors, metadata


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def expand_paths(paths: str | Sequence[str]) -> list[str]:
    """A file, a folder of shards, one shard of a `-0000K-of-0000N` set, or an explicit list."""
    if isinstance(paths, (list, tuple)):
        out = []
        for p in paths:
            out.extend(expand_paths(p))
        return sorted(set(out))
    path = os.fspath(paths)
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise CheckpointError(f"{path}: folder holds no .safetensors files")
        return files
    m = _SHARD.match(path)
    if m:
        count = int(m.group(3))
        files = [f"{m.group(1)}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]
        missing = [os.path.basename(f) for f in files if not os.path.isfile(f)]
        if missing:
            raise CheckpointError(f"{os.path.basename(path)}: sharded set is incomplete, missing {missing}")
        return files
    return [path]


@dataclass
class Checkpoint:
    """All tensors of one checkpoint (possibly several files), keyed in the original layout."""
    files: list[str]
    layout: str
    tensors: dict[str, TensorInfo]  # original-layout key -> where it lives
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return os.path.basename(self.files[0]) + (f" (+{len(self.files) - 1} shards)" if len(self.files) > 1 else "")

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}

    def stored_dtype(self, prefix: str = "blocks.") -> str:
        """Dtype of most weight matrices, e.g. 'bfloat16' or 'float8_e4m3fn'."""
        counts = Counter(str(v.dtype).replace("torch.", "") for k, v in self.tensors.items()
                         if k.startswith(prefix) and len(v.shape) >= 2)
        return counts.most_common(1)[0][0] if counts else "unknown"

    def read(self, key: str) -> torch.Tensor:
        """One tensor, read into its own host allocation (never a view of a mapping)."""
        info = self.tensors[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes:
            with open(info.file, "rb") as f:
                f.seek(info.start)
                buf = out.view(-1).view(torch.uint8) if out.dim() else out.reshape(1).view(torch.uint8)
                got = f.readinto(memoryview(buf.numpy()))
            if got != info.nbytes:
                raise CheckpointError(f"{os.path.basename(info.file)}: truncated while reading {info.key!r}")
        return out

    def lazy(self, keys=None) -> "LazyTensors":
        return LazyTensors(self, keys)


class LazyTensors(Mapping[str, torch.Tensor]):
    """Read-on-access view so a 30 GB checkpoint never sits in host RAM twice."""

    def __init__(self, ckpt: Checkpoint, keys=None):
        self.ckpt = ckpt
        self.keys_ = list(ckpt.tensors) if keys is None else [k for k in keys if k in ckpt.tensors]
        self.key_set = set(self.keys_)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self.key_set:
            raise KeyError(key)
        return self.ckpt.read(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys_)

    def __len__(self) -> int:
        return len(self.keys_)

    def __contains__(self, key) -> bool:
        return key in self.key_set


def open_checkpoint(paths: str | Sequence[str]) -> Checkpoint:
    files = expand_paths(paths)
    raw: dict[str, TensorInfo] = {}
    metadata: dict[str, str] = {}
    for path in files:
        tensors, meta = read_header(path)
        raw.update(tensors)
        metadata.update(meta)
    if not raw:
        raise CheckpointError(f"{os.path.basename(files[0])}: the file holds no tensors")
    layout = detect_layout(raw)
    tensors = {to_original(k, layout): v for k, v in raw.items()}
    return Checkpoint(files, layout, tensors, metadata)
