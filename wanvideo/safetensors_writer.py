"""Writing safetensors files byte by byte, so tests and the tiny-model generator can place tensors
at the offsets real files have (8 mod 16 after the reference writer's 8-byte header padding) or
at deliberately odd ones."""
from __future__ import annotations

import json
import struct
from typing import Mapping

import torch

from .checkpoint import SAFETENSORS_DTYPES

_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str, tensors: Mapping[str, torch.Tensor],
                      metadata: Mapping[str, str] | None = None,
                      data_start_mod16: int | None = 8, header_pad: int = 0) -> dict[str, int]:
    """A valid safetensors file with the tensors back to back in mapping order. The header is
    padded so the data section starts at `data_start_mod16` (mod 16; None = no alignment padding),
    then by `header_pad` more spaces. Returns key -> absolute byte offset of each tensor."""
    header, cursor, blobs = {}, 0, []
    for key, t in tensors.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        header[key] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [cursor, cursor + len(raw)]}
        cursor += len(raw)
        blobs.append(raw)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    if data_start_mod16 is not None:
        text += b" " * ((data_start_mod16 - (8 + len(text))) % 16)
    text += b" " * header_pad
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for raw in blobs:
            f.write(raw)
    base = 8 + len(text)
    return {key: base + entry["data_offsets"][0] for key, entry in header.items()
            if key != "__metadata__"}
