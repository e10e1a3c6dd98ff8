"""A tiny, randomly initialised Wan 2.1 VAE with the real checkpoint key layout.

ComfyUI's VAELoader recognises a Wan 2.1 VAE by `decoder.middle.0.residual.0.gamma` (and the
absence of the Wan 2.2 key `decoder.upsamples.0.upsamples.0.residual.2.weight`) and reads its base
width from `decoder.head.0.gamma`; everything else is fixed: z_dim 16, dim_mult [1, 2, 4, 4],
2 residual blocks per level, temporal downsampling [False, True, True]. So a file with the same
keys and a small base width loads through the native loader and encodes/decodes real-shaped
latents ([B,16,1+(F-1)/4,H/8,W/8]) in milliseconds. Used by tests and the demo; pure PyTorch.
"""
from __future__ import annotations

import math
import os

import torch

Z_DIM = 16
DIM_MULT = (1, 2, 4, 4)
NUM_RES_BLOCKS = 2
TEMPORAL_DOWNSAMPLE = (False, True, True)


def _conv(shapes: dict, name: str, c_out: int, c_in: int, kernel: tuple[int, ...]) -> None:
    shapes[f"{name}.weight"] = (c_out, c_in, *kernel)
    shapes[f"{name}.bias"] = (c_out,)


def _rms(shapes: dict, name: str, dim: int, images: bool = False) -> None:
    shapes[f"{name}.gamma"] = (dim, 1, 1) if images else (dim, 1, 1, 1)


def _residual(shapes: dict, name: str, c_in: int, c_out: int) -> None:
    _rms(shapes, f"{name}.residual.0", c_in)
    _conv(shapes, f"{name}.residual.2", c_out, c_in, (3, 3, 3))
    _rms(shapes, f"{name}.residual.3", c_out)
    _conv(shapes, f"{name}.residual.6", c_out, c_out, (3, 3, 3))
    if c_in != c_out:
        _conv(shapes, f"{name}.shortcut", c_out, c_in, (1, 1, 1))


def _attention(shapes: dict, name: str, dim: int) -> None:
    _rms(shapes, f"{name}.norm", dim, images=True)
    _conv(shapes, f"{name}.to_qkv", dim * 3, dim, (1, 1))
    _conv(shapes, f"{name}.proj", dim, dim, (1, 1))


def _resample(shapes: dict, name: str, dim: int, mode: str) -> None:
    if mode.startswith("up"):
        _conv(shapes, f"{name}.resample.1", dim // 2, dim, (3, 3))
        if mode == "upsample3d":
            _conv(shapes, f"{name}.time_conv", dim * 2, dim, (3, 1, 1))
    else:
        _conv(shapes, f"{name}.resample.1", dim, dim, (3, 3))
        if mode == "downsample3d":
            _conv(shapes, f"{name}.time_conv", dim, dim, (3, 1, 1))


def _middle(shapes: dict, name: str, dim: int) -> None:
    _residual(shapes, f"{name}.0", dim, dim)
    _attention(shapes, f"{name}.1", dim)
    _residual(shapes, f"{name}.2", dim, dim)


def _level(shapes, prefix: str, idx: int, c_in: int, c_out: int, blocks: int,
           resample: str | None) -> int:
    """One resolution level: `blocks` residual blocks, then the resampling layer if any.
    Returns the next layer index."""
    for _ in range(blocks):
        _residual(shapes, f"{prefix}.{idx}", c_in, c_out)
        c_in, idx = c_out, idx + 1
    if resample is not None:
        _resample(shapes, f"{prefix}.{idx}", c_out, resample)
        idx += 1
    return idx


def wan21_vae_shapes(dim: int = 8, z_dim: int = Z_DIM) -> dict[str, tuple[int, ...]]:
    """Every key of a Wan 2.1 VAE state dict with base width `dim` (the real one has 96)."""
    if dim < 2 or dim % 2:
        raise ValueError(f"VAE base width must be an even number >= 2, got {dim}")
    s: dict[str, tuple[int, ...]] = {}
    # encoder: outputs mean and log-variance, hence 2 * z_dim channels
    dims = [dim * m for m in (1, *DIM_MULT)]
    _conv(s, "encoder.conv1", dims[0], 3, (3, 3, 3))
    idx = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        resample = None if i == len(DIM_MULT) - 1 else \
            ("downsample3d" if TEMPORAL_DOWNSAMPLE[i] else "downsample2d")
        idx = _level(s, "encoder.downsamples", idx, c_in, c_out, NUM_RES_BLOCKS, resample)
    _middle(s, "encoder.middle", dims[-1])
    _rms(s, "encoder.head.0", dims[-1])
    _conv(s, "encoder.head.2", z_dim * 2, dims[-1], (3, 3, 3))
    _conv(s, "conv1", z_dim * 2, z_dim * 2, (1, 1, 1))
    _conv(s, "conv2", z_dim, z_dim, (1, 1, 1))
    # decoder: mirror image; every level after the first starts at half width (the upsample
    # convolution halves channels)
    dims = [dim * m for m in (DIM_MULT[-1], *DIM_MULT[::-1])]
    temporal_up = TEMPORAL_DOWNSAMPLE[::-1]
    _conv(s, "decoder.conv1", dims[0], z_dim, (3, 3, 3))
    _middle(s, "decoder.middle", dims[0])
    idx = 0
    for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:])):
        resample = None if i == len(DIM_MULT) - 1 else \
            ("upsample3d" if temporal_up[i] else "upsample2d")
        idx = _level(s, "decoder.upsamples", idx, c_in // 2 if i > 0 else c_in, c_out,
                     NUM_RES_BLOCKS + 1, resample)
    _rms(s, "decoder.head.0", dims[-1])
    _conv(s, "decoder.head.2", 3, dims[-1], (3, 3, 3))
    return s


def tiny_wan21_vae_state_dict(dim: int = 8, seed: int = 0,
                              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Deterministic random weights: norm gains 1, biases 0, convolutions N(0, 1/fan_in) so
    activations keep roughly unit scale through the network and decoded values stay finite."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(wan21_vae_shapes(dim).items()):
        if name.endswith(".gamma"):
            t = torch.ones(shape)
        elif name.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        out[name] = t.to(dtype).contiguous()
    return out


def write_tiny_wan_vae(path: str, dim: int = 8, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> str:
    """Write the tiny VAE as safetensors at `path` (folders created); returns `path`."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(tiny_wan21_vae_state_dict(dim, seed, dtype), path,
              metadata={"format": "pt", "tiny_wan21_vae_dim": str(dim), "seed": str(seed)})
    return path
