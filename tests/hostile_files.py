"""Broken, hostile and look-alike files for the hostile-input suites: raw safetensors built byte by
byte (so they can break the format's rules), NaN-poisoned copies of valid files, float WAVs with
NaN samples, FIFOs. No pytest and no pack import here."""
from __future__ import annotations

import json
import os
import struct

import numpy as np


def raw_safetensors(path: str, header: dict | str | bytes, data: bytes = b"") -> str:
    """A file with exactly this header (dict -> JSON; str/bytes written as they are)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + data)
    return path


def one_tensor_header(begin: int = 0, end: int = 16, shape=(2, 2), dtype: str = "F32",
                      key: str = "blocks.0.ffn.0.weight") -> dict:
    return {key: {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}}


HEADER_CASES = {
    # name: (header, data) breaking one rule of the safetensors format each
    "negative_offset": (one_tensor_header(-16, 0), bytes(16)),
    "overlapping_offsets": ({**one_tensor_header(0, 16),
                             **one_tensor_header(8, 24, key="blocks.0.ffn.2.weight")}, bytes(24)),
    "gap_between_tensors": ({**one_tensor_header(0, 16),
                             **one_tensor_header(24, 40, key="blocks.0.ffn.2.weight")}, bytes(40)),
    "data_not_covered": (one_tensor_header(0, 16), bytes(32)),
    "negative_shape": (one_tensor_header(0, 16, shape=(-2, -2)), bytes(16)),
    "huge_offset": (one_tensor_header(0, 2 ** 70), bytes(16)),
    "unknown_dtype": (one_tensor_header(dtype="F128"), bytes(16)),
    "metadata_not_object": ({"__metadata__": [1, 2], **one_tensor_header()}, bytes(16)),
    "metadata_not_strings": ({"__metadata__": {"a": {"b": 1}}, **one_tensor_header()}, bytes(16)),
    "deep_nesting": ("[" * 100_000 + "]" * 100_000, b""),
    "header_not_object": ("[1, 2, 3]", b""),
    "header_not_json": ("{not json", b""),
}


def header_beyond_file(path: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 10 ** 9) + b"{}")
    return path


def poisoned_copy(src: str, dst: str, value: float = float("nan"), key: str | None = None) -> str:
    """A copy of a safetensors file with one element of one floating tensor set to `value`;
    returns the key that was poisoned (the first floating tensor of rank >= 1 unless given)."""
    import torch
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open

    with safe_open(src, "pt") as f:
        meta = f.metadata()
    sd = load_file(src)
    key = key or next(k for k in sorted(sd) if sd[k].is_floating_point() and sd[k].dim() >= 1)
    t = sd[key].clone()
    flat = t.view(-1)
    flat[flat.numel() // 2] = torch.tensor(value, dtype=torch.float32).to(t.dtype)
    sd[key] = t
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    save_file(sd, dst, metadata=meta)
    return key


def float_wav(path: str, samples: np.ndarray, rate: int = 16000) -> str:
    """A mono IEEE-float WAV (the only WAV kind that can carry NaN/Inf samples)."""
    data = np.asarray(samples, dtype="<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, 1, rate, rate * 4, 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + \
        b"data" + struct.pack("<I", len(data)) + data
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", len(body)) + body)
    return path


def speech_like(seconds: float, rate: int = 16000, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.01 * g.standard_normal(t.shape)).astype(np.float32)


def fifo(path: str) -> str:
    """A named pipe: opening it for reading would block the server forever."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if not os.path.exists(path):
        os.mkfifo(path)
    return path
