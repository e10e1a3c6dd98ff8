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
from .sequence_parallel import agree_scale
from .triton_support import triton_available  # noqa: F401  (quant_linear asks it here)


@functools.lru_cache(maxsize=1)
def _kernels():
    import triton
    import triton.language as tl

    # GELU(approximate="tanh") is written out in both kernels (fp32 math, rounded to the input
    # dtype as torch writes it) as v * sigmoid(2u) = 0.5 v (1 + tanh u): no cancellation for negative v.

    @triton.jit
    def amax_scale(x_ptr, s_ptr, M, K, stride_x, FMAX: tl.constexpr, GELU: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK: tl.constexpr):
        # max |x| (or |gelu(x)|) of ROWS rows, folded into s = max(s, amax / FMAX) atomically;
        # s starts at the scale floor (1e-12), so s ends as clamp_min(amax / FMAX, 1e-12).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        rmask = rows < M
        base = x_ptr + rows[:, None] * stride_x
        acc = tl.zeros((ROWS, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            mask = rmask[:, None] & (offs[None, :] < K)
            v = tl.load(base + offs[None, :], mask=mask, other=0.0).to(tl.float32)
            if GELU:
                u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
                v = (v / (1.0 + tl.exp(-2.0 * u))).to(x_ptr.dtype.element_ty).to(tl.float32)
            acc = tl.maximum(acc, tl.abs(v))
        amax = tl.max(tl.max(acc, axis=1), axis=0)
        tl.atomic_max(s_ptr, amax / FMAX)

    @triton.jit
    def scale_cast_rows(x_ptr, q_ptr, s_ptr, K, stride_x, FMAX: tl.constexpr,
                        GELU: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * stride_x
        q_row = q_ptr + row * K
        inv = 1.0 / tl.load(s_ptr).to(tl.float32)
        for k0 in range(0, K, BLOCK):
            offs = k0 + tl.arange(0, BLOCK)
            v = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
            if GELU:
                u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
                v = (v / (1.0 + tl.exp(-2.0 * u))).to(x_ptr.dtype.element_ty).to(tl.float32)
            q = tl.minimum(tl.maximum(v * inv, -FMAX), FMAX)
            tl.store(q_row + offs, q.to(tl.float8e4nv), mask=offs < K)

    @triton.jit
    def quantize_rows(x_ptr, q_ptr, s_ptr, K, stride_x, FMAX: tl.constexpr, GELU: tl.constexpr,
                      FLOOR: tl.constexpr, BLOCK: tl.constexpr):
        # one row in one pass (the whole row in registers): its max |x| (or |gelu(x)|), the
        # row's scale clamp_min(amax / FMAX, FLOOR) and the fp8 cast against it
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        v = tl.load(x_ptr + row * stride_x + offs, mask=offs < K, other=0.0).to(tl.float32)
        if GELU:
            u = 0.7978845608028654 * (v + 0.044715 * v * v * v)
            v = (v / (1.0 + tl.exp(-2.0 * u))).to(x_ptr.dtype.element_ty).to(tl.float32)
        s = tl.maximum(tl.max(tl.abs(v), axis=0) / FMAX, FLOOR)
        q = tl.minimum(tl.maximum(v * (1.0 / s), -FMAX), FMAX)
        tl.store(q_ptr + row * K + offs, q.to(tl.float8e4nv), mask=offs < K)
        tl.store(s_ptr + row, s)

    return amax_scale, scale_cast_rows, quantize_rows


_AMAX_ROWS = 8
SCALE_FLOOR = 1e-12  # the smallest per-tensor scale (an all-zero activation)


def scale_accumulator(device) -> torch.Tensor:
    """A 0-d fp32 scale that kernels fold max|x| / 448 into with atomic max (the amax kernel
    here, the fused LayerNorms in fused_ops): starting at the floor, it ends as
    clamp_min(amax / 448, SCALE_FLOOR)."""
    return torch.full((), SCALE_FLOOR, dtype=torch.float32, device=device)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _quantize(x2: torch.Tensor, static_scale: torch.Tensor | None, gelu: bool):
    amax_k, cast_k, _ = _kernels()
    m, k = x2.shape
    block = 1024 if k >= 1024 else max(16, 1 << (k - 1).bit_length())
    if static_scale is None:
        # one reduction kernel writes the finished scale (no aminmax + 5 scalar ops)
        static_scale = scale_accumulator(x2.device)
        ablock = min(block, 512)
        amax_k[(_cdiv(m, _AMAX_ROWS),)](x2, static_scale, m, k, x2.stride(0),
                                              FMAX=FP8_E4M3_MAX, GELU=gelu, ROWS=_AMAX_ROWS,
                                              BLOCK=ablock, num_warps=8)
    # sequence parallel: the scale of the whole tensor, not of this rank's tokens
    static_scale = agree_scale(static_scale)
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    cast_k[(m,)](x2, q, static_scale, k, x2.stride(0), FMAX=FP8_E4M3_MAX, GELU=gelu, BLOCK=block,
                 num_warps=4)
    return q, static_scale


def quantize_tensor_triton(x2: torch.Tensor, static_scale: torch.Tensor | None):
    """x2 [M, K] (unit last stride) -> (fp8 [M, K] contiguous, fp32 0-d scale). The scale is
    `static_scale` when given (a file's input scale, or one already folded by the kernel that
    wrote x2), else per-tensor max|x| / 448 (floor 1e-12) from one Triton reduction pass that
    writes the scale itself; then one scale+cast pass. No host sync."""
    return _quantize(x2, static_scale, gelu=False)


def quantize_gelu_tanh_triton(h2: torch.Tensor, static_scale: torch.Tensor | None):
    """fp8(gelu_tanh(h2) / s) without materializing gelu_tanh(h2): the reduction pass and the cast
    pass each recompute GELU (fp32 math, rounded to h2's dtype like torch's output) from h2 [M, K].
    Same return as quantize_tensor_triton; equals quantizing F.gelu(h2, approximate="tanh") up to
    tanh rounding differences (~1 ulp in fp32)."""
    return _quantize(h2, static_scale, gelu=True)


ROWS_MAX_K = 16384   # quantize_rows holds a whole row in registers


def quantize_rows_triton(x2: torch.Tensor, gelu: bool = False):
    """x2 [M, K] (unit last stride, K <= ROWS_MAX_K) -> (fp8 [M, K] contiguous, fp32 [M, 1]
    per-row scales clamp_min(max|row| / 448, 1e-12)), in one pass over x2 (no per-tensor
    reduction first, no agreement between ranks of a split forward: a token's scale is its own).
    `gelu`: of gelu_tanh(x2) (rounded to x2's dtype, as torch writes it), as
    quantize_gelu_tanh_triton."""
    m, k = x2.shape
    if k > ROWS_MAX_K or x2.stride(-1) != 1:
        raise ValueError(f"rows of at most {ROWS_MAX_K} contiguous values, got {tuple(x2.shape)} "
                         f"with strides {x2.stride()}")
    q = torch.empty((m, k), dtype=torch.float8_e4m3fn, device=x2.device)
    scale = torch.empty((m, 1), dtype=torch.float32, device=x2.device)
    if m:
        block = max(16, 1 << (k - 1).bit_length())
        _kernels()[2][(m,)](x2, q, scale, k, x2.stride(0), FMAX=FP8_E4M3_MAX, GELU=gelu,
                            FLOOR=SCALE_FLOOR, BLOCK=block, num_warps=_rows_warps(block))
    return q, scale


def _rows_warps(block: int) -> int:
    """Warps of the row quantizer over `block` channels: 4 for 5,120-wide rows, 8 for ffn.2's
    13,824 (0.121 / 0.567 ms per 32,760 rows on an H200, against 0.130 / 0.582 with 8 / 16;
    bench/norm_warps.py, docs/BENCHMARKS.md thirteenth session)."""
    return min(16, max(4, block // 2048))


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
