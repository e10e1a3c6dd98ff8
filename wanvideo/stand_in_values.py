"""Deterministic random values for full-size stand-in files (`wanvideo/stand_ins.py`,
`multitalk/stand_ins.py`), streamed chunk by chunk into safetensors files.

A stand-in has the exact keys, shapes and dtypes of a public file but random weights, so the real
workflow can be run at full size (memory, speed, loading paths) where the real weights cannot be
downloaded. The values only need to keep a forward pass finite: matrices ~ N(0, 1/fan_in) keep
activations at unit scale, norm gains ~ 1, biases small. Every tensor has its own generator seeded
from (seed, key), so writing one file, or one tensor, never depends on what else is written.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from .safetensors_writer import write_streamed

# Elements generated at once (64 MB of float32): bounds RAM for the 1 B-element umT5 embedding.
CHUNK_ELEMENTS = 1 << 24
FP8_MAX = 448.0  # largest float8_e4m3fn value; e5m2 is wider


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a stand-in file: values ~ N(mean, std) (std 0: the constant `mean`)."""
    shape: tuple[int, ...]
    dtype: torch.dtype
    mean: float = 0.0
    std: float = 0.0
    payload: bytes | None = None  # fixed bytes (uint8 tensors such as a tokenizer model)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def default_init(key: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(mean, std) by role, read from the key and shape like the tiny models do."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "gamma":  # the Wan VAE's RMS norm gains
        return 1.0, 0.0
    if "modulation" in key:  # Wan's shift/scale/gate tables, added to the time embedding
        return 0.0, 0.1
    if leaf == "weight_g" or (len(shape) == 1 and leaf == "weight"):  # norm gains, weight norm
        return 1.0, 0.1
    if len(shape) >= 2:
        return 0.0, 1.0 / math.sqrt(math.prod(shape[1:]))
    return 0.0, 0.02  # biases, class / mask embeddings


def spec(key: str, shape, dtype: torch.dtype, **init) -> TensorSpec:
    """A TensorSpec with default_init's values unless `mean` / `std` are given."""
    shape = tuple(int(s) for s in shape)
    mean, std = default_init(key, shape)
    return TensorSpec(shape, dtype, init.get("mean", mean), init.get("std", std))


def tensor_seed(seed: int, key: str) -> int:
    return (int(seed) * 1_000_003 + zlib.crc32(key.encode())) % (2 ** 63)


def value_chunks(key: str, s: TensorSpec, seed: int = 0, max_elements: int | None = None,
                 device: str | torch.device | None = None) -> Iterator[torch.Tensor]:
    """The tensor's values in row blocks along dim 0 (whole if 0-d), already in s.dtype, on the
    CPU. `device` draws them there (a GPU writes a 14B stand-in in seconds, not minutes); each
    device's generator gives its own deterministic values."""
    if s.payload is not None:
        yield torch.frombuffer(bytearray(s.payload), dtype=torch.uint8)
        return
    gen = torch.Generator(device=device or "cpu").manual_seed(tensor_seed(seed, key))
    if not s.shape or math.prod(s.shape) == 0:
        yield _values(s, s.shape, gen)
        return
    row = math.prod(s.shape[1:])
    step = max(1, (max_elements or CHUNK_ELEMENTS) // row)
    for start in range(0, s.shape[0], step):
        yield _values(s, (min(step, s.shape[0] - start), *s.shape[1:]), gen)


def _values(s: TensorSpec, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if s.std == 0:
        v = torch.full(shape, float(s.mean), device=gen.device)
    else:
        v = torch.randn(shape, generator=gen, device=gen.device).mul_(s.std).add_(s.mean)
    if s.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        v = v.clamp_(-FP8_MAX, FP8_MAX)  # casting to fp8 does not saturate
    return v.to(s.dtype).cpu()


def file_order(specs: Mapping[str, TensorSpec]) -> list[str]:
    """Widest dtype first, then by name (what the safetensors writer does): with the data section
    8-byte aligned, every tensor then starts on a multiple of its element size."""
    return sorted(specs, key=lambda k: (-specs[k].dtype.itemsize, k))


def write_specs(path: str, specs: Mapping[str, TensorSpec], seed: int = 0,
                metadata: Mapping[str, str] | None = None,
                device: str | torch.device | None = None) -> str:
    """Stream a stand-in safetensors file to `path` (folders created); returns `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    ordered = {k: (specs[k].shape, specs[k].dtype) for k in file_order(specs)}
    write_streamed(path, ordered,
                   lambda key: value_chunks(key, specs[key], seed, device=device), metadata)
    return path


def materialize(specs: Mapping[str, TensorSpec], seed: int = 0) -> dict[str, torch.Tensor]:
    """The tensors write_specs would write, in file order, in memory (small files, tests)."""
    out = {}
    for k in file_order(specs):
        pieces = list(value_chunks(k, specs[k], seed))
        out[k] = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
    return out
