"""Writing safetensors files byte by byte, so tests and the tiny-model generator can place tensors
at the offsets real files have (8 mod 16 after the reference writer's 8-byte header padding) or
at deliberately odd ones, and so full-size stand-in files (tens of GB) can be streamed to disk one
chunk at a time: the header depends only on names, dtypes and shapes, so it is written first."""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Iterable, Mapping

import torch

from .checkpoint import SAFETENSORS_DTYPES

_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def tensor_nbytes(shape, dtype: torch.dtype) -> int:
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def _header(entries: Iterable[tuple[str, torch.dtype, tuple[int, ...]]],
            metadata: Mapping[str, str] | None, data_start_mod16: int | None,
            header_pad: int) -> tuple[bytes, dict]:
    """The length-prefixed header for tensors stored back to back in `entries` order; returns
    (bytes before the data section, key -> header entry)."""
    header, cursor = {}, 0
    for key, dtype, shape in entries:
        size = tensor_nbytes(shape, dtype)
        header[key] = {"dtype": _NAMES[dtype], "shape": list(shape),
                       "data_offsets": [cursor, cursor + size]}
        cursor += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    if data_start_mod16 is not None:
        text += b" " * ((data_start_mod16 - (8 + len(text))) % 16)
    text += b" " * header_pad
    return struct.pack("<Q", len(text)) + text, header


def _offsets(prefix: bytes, header: dict) -> dict[str, int]:
    return {key: len(prefix) + entry["data_offsets"][0] for key, entry in header.items()
            if key != "__metadata__"}


def _raw(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None,
                      data_start_mod16: int | None = 8, header_pad: int = 0) -> dict[str, int]:
    """A valid safetensors file with the tensors back to back in mapping order. The header is
    padded so the data section starts at `data_start_mod16` (mod 16; None = no alignment padding),
    then by `header_pad` more spaces. Returns key -> absolute byte offset of each tensor."""
    entries = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    prefix, header = _header(entries, metadata, data_start_mod16, header_pad)
    with open(path, "wb") as f:
        f.write(prefix)
        for t in tensors.values():
            f.write(_raw(t))
    return _offsets(prefix, header)


def write_streamed(path: str, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                   chunks: Callable[[str], Iterable[torch.Tensor]],
                   metadata: Mapping[str, str] | None = None,
                   data_start_mod16: int | None = 8) -> dict[str, int]:
    """The same file as `write_safetensors` of the tensors `specs` describes (key -> (shape,
    dtype), in file order), without ever holding more than one chunk: `chunks(key)` yields that
    tensor's values as pieces of the declared dtype whose bytes, concatenated, are the tensor.
    Written under a temporary name and renamed at the end, so an interrupted run never leaves a
    file that looks complete. Returns key -> absolute byte offset."""
    entries = [(k, dtype, tuple(shape)) for k, (shape, dtype) in specs.items()]
    prefix, header = _header(entries, metadata, data_start_mod16, 0)
    partial = path + ".partial"
    with open(partial, "wb") as f:
        f.write(prefix)
        for key, dtype, shape in entries:
            written = 0
            for piece in chunks(key):
                if piece.dtype != dtype:
                    raise ValueError(f"{key}: chunk is {piece.dtype}, the header says {dtype}")
                raw = _raw(piece)
                f.write(raw)
                written += len(raw)
            if written != tensor_nbytes(shape, dtype):
                raise ValueError(f"{key}: wrote {written} bytes, shape {list(shape)} {dtype} "
                                 f"needs {tensor_nbytes(shape, dtype)}")
    os.replace(partial, path)
    return _offsets(prefix, header)
