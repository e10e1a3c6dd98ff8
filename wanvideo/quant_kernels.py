"""GPU helpers of the quantized linear layers: one-pass activation quantization to fp8 and the
NVFP4 weight dequantization. Imported only when a CUDA path is chosen; nothing runs at import.

Why fused: quantizing the activation with eager torch ops (abs, amax, div, clamp, cast) reads the
activation ~4 times and gave only 1.01x over bf16 on an H100; one reduction pass plus one
scale+cast kernel keeps most of the fp8 GEMM's 1.8x.
"""
from __future__ import annotations

import functools

import torch

from .quant_formats import FP8_E4M3_MAX, nvfp4_dequantize


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return False
    return True


@functools.lru_cache(maxsize=1)
def _cast_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def scale_cast_rows(x_ptr, q_ptr, s_ptr, K, stride_x, FMAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * K
        inv = 1.0 / tl.load(s_ptr).to(tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(v * inv, -FMAX), FMAX)
            tl.store(q_row + offs, q.to(tl.float8e4nv), mask=offs < K)

    return scale_cast_rows


def quantize_tensor_triton(x2: torch.Tensor, static_scale: torch.Tensor | None):
    """x2 [M, K] (unit last stride) -> (fp8 [M, K] contiguous, fp32 0-d scale). The scale is the
    file's static input scale, or per-tensor from one aminmax pass (no |x| temporary); then one
    scale+cast pass. The scale stays on the device: no host sync."""
    if static_scale is None:
        lo, hi = torch.aminmax(x2)
        static_scale = torch.maximum(lo.abs(), hi.abs()).float().div_(FP8_E4M3_MAX).clamp_min_(1e-12)
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    block = 1024 if k >= 1024 else max(16, 1 << (k - 1).bit_length())
    _cast_kernel()[(m,)](x2, q, static_scale, k, x2.stride(0), FMAX=FP8_E4M3_MAX, BLOCK=block,
                         num_warps=4)
    return q, static_scale


def _quantize_torch(x2: torch.Tensor, static_scale: torch.Tensor | None):
    xf = x2.float()
    s = static_scale if static_scale is not None else \
        (xf.abs().amax() / FP8_E4M3_MAX).clamp_min(1e-12)
    q = (xf / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s


@functools.lru_cache(maxsize=1)
def compiled_quantizer():
    """torch.compile'd fallback when triton is missing: inductor fuses amax + cast."""
    return torch.compile(_quantize_torch, dynamic=True)


@functools.lru_cache(maxsize=1)
def compiled_nvfp4_dequant():
    """NVFP4 -> bf16 dequantization compiled into one fused kernel (unpack, LUT, scale, cast)."""
    return torch.compile(nvfp4_dequantize, dynamic=False)
