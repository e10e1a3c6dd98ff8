"""Pure tensor math of the quantized weight formats (no modules, no files).

- fp8 e4m3fn/e5m2, per-tensor fp32 scale: W = W_fp8 * scale (scale 1 for weight-only files).
- NVFP4: E2M1 codes packed two per uint8 along K (even K index in the low nibble, as NVIDIA's
  float4_e2m1fn_x2 and ComfyUI files store them), one float8_e4m3fn block scale per 16 K elements,
  one fp32 global scale: W = e2m1 * block_scale * global_scale.
- cuBLAS "128x4" block-scale swizzle used by ComfyUI files for NVFP4 block scales: the [rows, cols]
  scale matrix is padded to multiples of (128, 4); each 128x4 tile is stored as 32x16 bytes where
  byte (r % 32, (r // 32) * 4 + c) holds element (r, c) of the tile; tiles run along cols first.
"""
from __future__ import annotations

import json

import torch

FP8_E4M3_MAX = 448.0
E2M1_MAX = 6.0
NVFP4_BLOCK = 16
# Code -> value for the 16 E2M1 codes (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# Rounding boundaries between consecutive magnitudes (midpoints) for quantization.
_E2M1_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)

FP8_DTYPES = {"float8_e4m3fn": torch.float8_e4m3fn, "float8_e5m2": torch.float8_e5m2}


def roundup(x: int, m: int) -> int:
    return -(-x // m) * m


# ----------------------------------------------------------------------------------- fp8

def fp8_quantize(w: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn,
                 scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_fp8, scale fp32 0-d). Scaled: per-tensor amax maps to the format's max. Weight-only:
    scale 1 (values outside the range saturate)."""
    fmax = torch.finfo(dtype).max
    w32 = w.detach().float()
    if scaled:
        scale = (w32.abs().amax() / fmax).clamp_min(torch.finfo(torch.float32).tiny)
    else:
        scale = torch.ones((), dtype=torch.float32, device=w.device)
    q = (w32 / scale).clamp_(-fmax, fmax).to(dtype)
    return q, scale.reshape(()).to(torch.float32)


def fp8_dequantize(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """One materialization in `dtype`; the scale multiply runs in place on it."""
    w = q.to(dtype)
    if scale is not None:
        w.mul_(scale.to(dtype))
    return w


# ----------------------------------------------------------------------------------- e2m1

def e2m1_encode(x: torch.Tensor) -> torch.Tensor:
    """Round-to-nearest E2M1 codes (uint8 0..15) of values already scaled into [-6, 6]."""
    mids = torch.tensor(_E2M1_MIDPOINTS, dtype=torch.float32, device=x.device)
    mag = torch.bucketize(x.abs().float(), mids, right=False).to(torch.uint8)
    sign = (x < 0).to(torch.uint8) << 3
    return mag | sign


def e2m1_decode_lut(device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(E2M1_VALUES, dtype=dtype, device=device)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes -> [N, K/2] uint8, even K index in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """[N, K/2] uint8 -> [N, K] codes (uint8)."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


# ----------------------------------------------------------------------------------- swizzle

def swizzle_block_scales(s: torch.Tensor) -> torch.Tensor:
    """[rows, cols] -> cuBLAS 128x4 tiled layout, returned 2-D as [roundup(rows,128),
    roundup(cols,4)] (the shape ComfyUI files store)."""
    rows, cols = s.shape
    rp, cp = roundup(rows, 128), roundup(cols, 4)
    padded = torch.zeros(rp, cp, dtype=s.dtype, device=s.device)
    padded[:rows, :cols] = s
    tiles = padded.view(rp // 128, 128, cp // 4, 4).permute(0, 2, 1, 3)      # [RB, CB, 128, 4]
    tiles = tiles.reshape(rp // 128, cp // 4, 4, 32, 4).transpose(2, 3)      # [RB, CB, 32, 4, 4]
    return tiles.reshape(rp, cp).contiguous()


def unswizzle_block_scales(s: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of swizzle_block_scales, cropped to [rows, cols]. Accepts the 2-D or flat form."""
    rp, cp = roundup(rows, 128), roundup(cols, 4)
    if s.numel() != rp * cp:
        raise ValueError(f"swizzled block scales hold {s.numel()} values, expected {rp}x{cp}")
    tiles = s.reshape(rp // 128, cp // 4, 32, 4, 4).transpose(2, 3)          # [RB, CB, 4, 32, 4]
    tiles = tiles.reshape(rp // 128, cp // 4, 128, 4).permute(0, 2, 1, 3)    # [RB, 128, CB, 4]
    return tiles.reshape(rp, cp)[:rows, :cols].contiguous()


# ----------------------------------------------------------------------------------- nvfp4

def nvfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[N, K] -> (packed uint8 [Np, Kp/2], block scales e4m3 [Np, Kp/16] (NOT swizzled),
    global fp32 0-d). Np, Kp = N, K rounded up to 16 (zero padding, as ComfyUI pads)."""
    n, k = w.shape
    npad, kpad = roundup(n, 16), roundup(k, 16)
    w32 = torch.zeros(npad, kpad, dtype=torch.float32, device=w.device)
    w32[:n, :k] = w.detach().float()
    glob = (w32.abs().amax() / (FP8_E4M3_MAX * E2M1_MAX)).clamp_min(torch.finfo(torch.float32).tiny)
    blocks = w32.view(npad, kpad // NVFP4_BLOCK, NVFP4_BLOCK)
    bscale = (blocks.abs().amax(-1) / E2M1_MAX / glob).clamp_(max=FP8_E4M3_MAX)
    bscale8 = bscale.to(torch.float8_e4m3fn)
    eff = bscale8.float() * glob                                   # the scale decoding will use
    scaled = torch.where(eff.unsqueeze(-1) > 0, blocks / eff.unsqueeze(-1).clamp_min(1e-30),
                         torch.zeros_like(blocks)).clamp_(-E2M1_MAX, E2M1_MAX)
    codes = e2m1_encode(scaled.view(npad, kpad))
    return pack_e2m1(codes), bscale8.contiguous(), glob.reshape(())


def nvfp4_dequantize(packed: torch.Tensor, block_scale: torch.Tensor, global_scale: torch.Tensor,
                     shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """Unswizzled block scales [Np, Kp/16]; returns [N, K] in `dtype` (cropping the padding)."""
    n, k = shape
    npad, half = packed.shape
    kpad = half * 2
    lut = e2m1_decode_lut(packed.device, torch.float32)
    vals = lut[unpack_e2m1(packed).long()].view(npad, kpad // NVFP4_BLOCK, NVFP4_BLOCK)
    scale = block_scale.float() * global_scale.float()
    w = (vals * scale.unsqueeze(-1)).view(npad, kpad)
    return w[:n, :k].to(dtype)


# ----------------------------------------------------------------------------------- comfy_quant

def encode_comfy_quant(conf: dict) -> torch.Tensor:
    """The `<layer>.comfy_quant` tensor: uint8 bytes of the JSON config."""
    data = json.dumps(conf).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.uint8)


def decode_comfy_quant(t: torch.Tensor) -> dict:
    return json.loads(bytes(t.detach().cpu().to(torch.uint8).tolist()).decode("utf-8"))
