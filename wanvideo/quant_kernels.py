"""GPU helpers of the quantized linear layers: one-pass activation quantization to fp8 and the
NVFP4 weight dequantization. Imported only when a CUDA path is chosen; nothing runs at import.

Why fused: quantizing the activation with eager torch ops (abs, amax, div, clamp, cast) reads the
activation ~4 times and gave only 1.01x over bf16 on an H100; one kernel that computes each row's
amax and writes the fp8 row keeps the fp8 GEMM's 1.8x mostly intact.
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
def _rowwise_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def quant_rows(x_ptr, q_ptr, s_ptr, static_ptr, K, stride_x,
                   STATIC: tl.constexpr, FMAX: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * K
        if STATIC:
            scale = tl.load(static_ptr).to(tl.float32)
        else:
            amax = tl.zeros([BLOCK], dtype=tl.float32)
            for k0 in range(0, K, BLOCK):
                offs = k0 + tl.arange(0, BLOCK)
                v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
                amax = tl.maximum(amax, tl.abs(v))
            scale = tl.maximum(tl.max(amax, axis=0), 1e-12) / FMAX
            tl.store(s_ptr + row, scale)
        inv = 1.0 / scale
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            q = tl.minimum(tl.maximum(v * inv, -FMAX), FMAX)
            tl.store(q_row + offs, q.to(tl.float8e4nv), mask=offs < K)

    return quant_rows


def quantize_rows_triton(x2: torch.Tensor, static_scale: torch.Tensor | None):
    """x2 [M, K] (unit last stride) -> (fp8 [M, K] contiguous, scale [M, 1] fp32 or the static
    0-d scale). One kernel: per row, amax pass then scale+cast pass (the row stays in L1/L2)."""
    m, k = x2.shape
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    if static_scale is None:
        s = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
        static = s
    else:
        s = static_scale
        static = static_scale
    block = 1024 if k >= 1024 else max(16, 1 << (k - 1).bit_length())
    _rowwise_kernel()[(m,)](x2, q, s, static, k, x2.stride(0),
                            STATIC=static_scale is not None, FMAX=FP8_E4M3_MAX, BLOCK=block,
                            num_warps=4)
    return q, s


def _quantize_torch(x2: torch.Tensor, static_scale: torch.Tensor | None, rowwise: bool):
    xf = x2.float()
    if static_scale is not None:
        s = static_scale
    elif rowwise:
        s = (xf.abs().amax(dim=1, keepdim=True) / FP8_E4M3_MAX).clamp_min(1e-12)
    else:
        s = (xf.abs().amax() / FP8_E4M3_MAX).clamp_min(1e-12)
    q = (xf / s).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q, s


@functools.lru_cache(maxsize=None)
def compiled_quantizer(rowwise: bool):
    """torch.compile'd fallback when triton is missing: inductor fuses amax + cast."""
    fn = functools.partial(_quantize_torch, rowwise=rowwise)
    return torch.compile(fn, dynamic=True)


@functools.lru_cache(maxsize=1)
def compiled_nvfp4_dequant():
    """NVFP4 -> bf16 dequantization compiled into one fused kernel (unpack, LUT, scale, cast)."""
    return torch.compile(nvfp4_dequantize, dynamic=False)
