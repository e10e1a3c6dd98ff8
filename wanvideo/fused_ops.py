"""One-pass Triton kernels for the elementwise work around a block's GEMMs (CUDA only).

Why: a profile of two 14B blocks at 32,760 tokens (dim 5120, bf16) on an H100 showed ~35 ms of
~170 ms in elementwise kernels: among them the fp32 LayerNorms of norm1/norm2/norm3 followed by the
modulation and the cast to the compute dtype, and for q and k the bf16->fp32 copy, RMSNorm, the copy
back, the complex RoPE multiply and another copy. Each chain reads and writes the [B, L, C]
activation several times; the kernels here read it once and write the result once, in the dtype
the next GEMM wants (measured: bench/fused_ops.py, bench/results/fused_ops_h100.json).

- `rms_norm_rope`: RMSNorm over the whole dim (fp32 math, weight applied), then the rotation of
  adjacent channel pairs within each head by fp32 cos/sin [L, head_dim/2] (see rope.cos_sin).
- `rms_norm`: the same without the rotation (cross-attention norms).
- `layer_norm` / `modulated_layer_norm`: fp32 LayerNorm (optionally affine), or without affine
  followed by `norm * (1 + scale) + shift`, written in `out_dtype`.
- `gated_residual_`: the fp32 residual update x += y * gate (gate [B, 1, C]) or x += y in place,
  reading x and y once (torch's broadcasting addcmul ran unvectorised, ~1.2 ms at 32,760 tokens);
  `residual_layer_norm` also writes the next LayerNorm (affine or modulated) of the new x in the
  same pass, so the block never re-reads the residual for its norms.
- `amax_to` (LayerNorm outputs that feed fp8 `_scaled_mm` layers): the same pass also folds
  max|h| / 448 into a per-tensor fp8 scale (see quant_kernels.scale_accumulator), so the layer
  only casts h instead of first re-reading all of it for the scale.
- `fp8_rows` (the same layers, where per-row activation scales are used): the pass writes h
  only as fp8 with one scale per row (max|row| / 448 of the values rounded to `out_dtype`, the
  scale scaled_mm's row-wise mode takes), equal to writing h and quantize_rows_triton on it; the
  layer then reads 1 byte per value once instead of 2 bytes twice.

`enabled(x)` decides with cheap checks (device, the env switch WANVIDEO_FUSED=0, a cached triton
import test); callers keep the torch code as the reference and the path for CPU / no triton.
Nothing runs at import and no state is kept beyond the cached kernels.
"""
from __future__ import annotations

import functools
import os

import torch

from .quant_formats import FP8_E4M3_MAX
from .triton_support import triton_available


def enabled(x: torch.Tensor) -> bool:
    """True when the fused kernels serve `x`: a CUDA tensor, triton importable, and the
    environment switch WANVIDEO_FUSED not set to 0. CPU tensors never reach triton."""
    return x.is_cuda and os.environ.get("WANVIDEO_FUSED", "1") != "0" and triton_available()


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


def _warps(block: int) -> int:
    return min(16, max(4, block // 512))


def _norm_warps(block: int, fp8_rows: bool) -> int:
    """Warps of the LayerNorm / residual kernel (and the RMSNorm without rotation) over `block`
    channels: 4 when it writes fp8 rows, else at most 8. On an H200 (32,760 x 5,120) 16 warps
    were the slowest of 2 / 4 / 8 / 16 for every norm the model runs: e.g. the modulated norm
    writing fp8 rows 0.436 -> 0.343 ms, the gated residual + affine norm 0.652 -> 0.506 ms
    (bench/norm_warps.py, docs/BENCHMARKS.md, thirteenth session)."""
    return 4 if fp8_rows else min(8, _warps(block))


def _rope_plan(block: int, head_half: int) -> tuple[int, int]:
    """(HH, num_warps) of the RMSNorm + RoPE kernel over `block` channels: HH = head_dim / 2
    when it is a power of two dividing the block, so each row loads one table row for all heads
    (else 0: a table lookup per channel pair), and 8 warps at most. On an H200, 32,760 rows of
    5,120 channels: 0.21 ms against 0.44 ms with the lookup per pair and 16 warps
    (docs/BENCHMARKS.md, thirteenth session)."""
    hh = head_half if head_half & (head_half - 1) == 0 and block % (2 * head_half) == 0 else 0
    return hh, min(8, _warps(block))


@functools.lru_cache(maxsize=1)
def _rms_rope_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def rms_rope(x_ptr, w_ptr, cos_ptr, sin_ptr, y_ptr, own_ptr, L, HALF_DIM, HALF_HEAD,
                 stride_x, stride_cl, stride_cp, stride_sl, stride_sp, eps, ROWS, ME, WORLD,
                 PIECES, SLOTS, SLOT, ROPE: tl.constexpr, BLOCK: tl.constexpr,
                 CHUNK: tl.constexpr, SUB: tl.constexpr, HH: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, 2 * BLOCK)  # contiguous channels: vector loads and stores
        mask = offs < 2 * HALF_DIM
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / (2 * HALF_DIM) + eps)
        y = x * rstd * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if ROPE and HH > 0:  # HH = head_dim / 2, a power of two: one table row for all heads
            ne, no = tl.split(tl.reshape(y, (BLOCK // HH, HH, 2)))  # [head, pair] each
            p = tl.arange(0, HH)
            pos = row % L
            c = tl.load(cos_ptr + pos * stride_cl + p * stride_cp)[None, :]
            s = tl.load(sin_ptr + pos * stride_sl + p * stride_sp)[None, :]
            y = tl.reshape(tl.join(ne * c - no * s, ne * s + no * c), (2 * BLOCK,))
        elif ROPE:
            ne, no = tl.split(tl.reshape(y, (BLOCK, 2)))  # channels 2j, 2j+1
            j = tl.arange(0, BLOCK)
            pos = row % L
            p = j % HALF_HEAD
            c = tl.load(cos_ptr + pos * stride_cl + p * stride_cp, mask=j < HALF_DIM, other=0.0)
            s = tl.load(sin_ptr + pos * stride_sl + p * stride_sp, mask=j < HALF_DIM, other=0.0)
            y = tl.reshape(tl.join(ne * c - no * s, ne * s + no * c), (2 * BLOCK,))
        if CHUNK == 0:
            tl.store(y_ptr + row * (2 * HALF_DIM) + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
        else:  # head_exchange's send layout: runs of SUB channels, each inside one head group
            s = tl.arange(0, 2 * BLOCK // SUB)
            first = s * SUB
            g = first // CHUNK
            j = g // PIECES
            base = (((g - j * PIECES) * SLOTS + SLOT) * WORLD + j).to(tl.int64) * ROWS * CHUNK \
                + row * CHUNK + (first - g * CHUNK)
            cols = tl.arange(0, SUB)
            off = base[:, None] + cols[None, :]
            dst = tl.where((j == ME)[:, None], own_ptr + off, y_ptr + off)
            tl.store(dst, tl.reshape(y, (2 * BLOCK // SUB, SUB)).to(y_ptr.dtype.element_ty),
                     mask=(first[:, None] + cols[None, :]) < 2 * HALF_DIM)

    return rms_rope


@functools.lru_cache(maxsize=1)
def _layer_norm_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def layer_norm(x_ptr, y_ptr, a_ptr, b_ptr, r_ptr, g_ptr, xo_ptr, s_ptr, C, L, stride_x,
                   stride_ab, stride_bb, stride_r, stride_g, eps, RESIDUAL: tl.constexpr,
                   GATE: tl.constexpr, NORM: tl.constexpr, MODULATE: tl.constexpr,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, AMAX: tl.constexpr,
                   FMAX: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        mask = offs < C
        batch = row // L
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        if RESIDUAL:  # x (fp32) += r [* gate [B, 1, C]], written to xo (may alias x)
            r = tl.load(r_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
            if GATE:
                r = r * tl.load(g_ptr + batch * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
            x = x + r
            tl.store(xo_ptr + row * C + offs, x, mask=mask)
        if NORM:
            mean = tl.sum(x, axis=0) / C
            d = tl.where(mask, x - mean, 0.0)
            rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=0) / C + eps)
            y = d * rstd
            if MODULATE:  # a = scale, b = shift, both [B, 1, C]
                scale = tl.load(a_ptr + batch * stride_ab + offs, mask=mask, other=0.0).to(tl.float32)
                shift = tl.load(b_ptr + batch * stride_bb + offs, mask=mask, other=0.0).to(tl.float32)
                y = y * (1.0 + scale) + shift
            else:
                if HAS_W:
                    y = y * tl.load(a_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if HAS_B:
                    y = y + tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            if ROWS:  # fp8 with the row's scale, from the values rounded to the compute dtype
                if ROWS == 1:
                    y = y.to(tl.bfloat16).to(tl.float32)
                else:
                    y = y.to(tl.float16).to(tl.float32)
                sc = tl.maximum(tl.max(tl.abs(y), axis=0) / FMAX, 1e-12)
                q = tl.minimum(tl.maximum(y * (1.0 / sc), -FMAX), FMAX)
                tl.store(y_ptr + row * C + offs, q.to(tl.float8e4nv), mask=mask)
                tl.store(s_ptr + row, sc)
            else:
                y = y.to(y_ptr.dtype.element_ty)
                tl.store(y_ptr + row * C + offs, y, mask=mask)
                if AMAX:  # of the stored (rounded) values, which the fp8 cast will read
                    tl.atomic_max(s_ptr, tl.max(tl.abs(y.to(tl.float32)), axis=0) / FMAX)

    return layer_norm


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as [rows, C] with a unit last stride (a view when possible)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _launch_rms(x, weight, eps, cos, sin, num_heads, exchange=None):
    dim = x.shape[-1]
    seq = x.shape[-2] if x.dim() >= 2 else 1
    x2 = _rows(x)
    if exchange is None:
        y = own = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        layout, chunk, sub = (x2.shape[0], -1, 1, 1, 1, 0), 0, 1
    else:
        y, own, me, slot = exchange
        layout, chunk, sub = _exchange_layout(x, y, own, me, slot)
    if x2.shape[0] == 0:
        return y
    half = dim // 2
    block = _block(half)
    rope = cos is not None
    if rope:
        head_half = dim // num_heads // 2
        if dim % (2 * num_heads) or tuple(cos.shape) != (seq, head_half) or cos.shape != sin.shape:
            raise ValueError(f"rope tables {tuple(cos.shape)} do not fit x {tuple(x.shape)} "
                             f"with {num_heads} heads")
        args = (cos, sin, seq, half, head_half, x2.stride(0), cos.stride(0), cos.stride(1),
                sin.stride(0), sin.stride(1))
    else:
        args = (weight, weight, 1, half, 1, x2.stride(0), 0, 0, 0, 0)
    hh, warps = _rope_plan(2 * block, args[4]) if rope else (0, _norm_warps(2 * block, False))
    _rms_rope_kernel()[(x2.shape[0],)](x2, weight, args[0], args[1], y, own, *args[2:],
                                       float(eps), *layout, ROPE=rope, BLOCK=block, CHUNK=chunk,
                                       SUB=sub, HH=hh, num_warps=warps)
    return y


def _exchange_layout(x, send, own, me, slot):
    """The kernel's (ROWS, ME, WORLD, PIECES, SLOTS, SLOT), CHUNK and SUB for writing x [B, n,
    dim] into head_exchange's send [pieces, slots, world, B, n, hp, D], rank `me`'s heads into
    `own` (same layout) instead."""
    pieces, slots, world, b, n, hp, d = send.shape
    ok = (send.is_contiguous() and own.is_contiguous() and own.shape == send.shape
          and send.dtype == own.dtype == x.dtype and send.device == own.device == x.device
          and (b, n, world * pieces * hp * d) == tuple(x.shape) and 0 <= slot < slots
          and 0 <= me < world)
    if not ok:
        raise ValueError(f"exchange buffers {tuple(send.shape)} / {tuple(own.shape)} "
                         f"({send.dtype}) do not fit x {tuple(x.shape)} ({x.dtype}) at slot "
                         f"{slot}, rank {me}")
    chunk = hp * d
    return (b * n, me, world, pieces, slots, slot), chunk, min(256, chunk & -chunk)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, rot_cos: torch.Tensor,
                  rot_sin: torch.Tensor, num_heads: int, exchange=None) -> torch.Tensor:
    """x [B, L, dim] -> RMSNorm(x) * weight, each head's adjacent channel pairs rotated by
    (rot_cos, rot_sin) [L, head_dim/2] fp32 (strided views are fine); same shape and dtype as x.
    `exchange` (send, own, me, slot): write the result into slot `slot` of the Ulysses send
    buffer instead, as head_exchange.pack((result,), send, own=own, me=me, slot=slot) would
    (returns send). Caller checks `enabled(x)` first."""
    if x.shape[-1] % 2:
        raise ValueError("dim must be even")
    return _launch_rms(x, weight, eps, rot_cos, rot_sin, num_heads, exchange)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (fp32 math, weight applied), returned in x's dtype."""
    if x.shape[-1] % 2:
        raise ValueError("dim must be even")
    return _launch_rms(x, weight, eps, None, None, 1)


def _launch_ln(x, out_dtype, eps, a, b, modulate, stride_ab=0, stride_bb=0, seq=1,
               residual=None, gate=None, x_out=None, norm=True, amax_to=None, fp8_rows=False):
    """One row per program: [x_out = x + residual (* gate)], then [LayerNorm -> y in out_dtype,
    max|y| / 448 folded into amax_to]. Returns y (None when norm is False); with `fp8_rows`
    (y_fp8 [..., C], fp32 scales [rows, 1]) instead, see the module docstring."""
    if amax_to is not None and (not norm or amax_to.dtype != torch.float32 or amax_to.numel() != 1
                                or amax_to.device != x.device):
        raise ValueError("amax_to must be a one-element fp32 tensor on x's device, with norm=True")
    if fp8_rows and (not norm or amax_to is not None
                     or out_dtype not in (torch.bfloat16, torch.float16)):
        raise ValueError("fp8_rows needs norm=True, no amax_to and a bf16 or fp16 out_dtype, "
                         f"got out_dtype {out_dtype}")
    c = x.shape[-1]
    x2 = _rows(x)
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn if fp8_rows else out_dtype,
                    device=x.device) if norm else None
    scales = (torch.empty((x2.shape[0], 1), dtype=torch.float32, device=x.device) if fp8_rows
              else amax_to)   # the kernel's s_ptr: the row scales, or the per-tensor slot
    if x2.shape[0] == 0:
        return (y, scales) if fp8_rows else y
    block = _block(c)
    dummy = x2
    r2 = dummy if residual is None else _rows(residual)
    g2 = dummy if gate is None else _rows(gate)
    stride_g = g2.stride(0) if gate is not None and g2.shape[0] > 1 else 0
    _layer_norm_kernel()[(x2.shape[0],)](x2, dummy if y is None else y, dummy if a is None else a,
                                  dummy if b is None else b, r2, g2,
                                  dummy if x_out is None else x_out,
                                  dummy if scales is None else scales,
                                  c, seq, x2.stride(0), stride_ab, stride_bb, r2.stride(0),
                                  stride_g, float(eps), RESIDUAL=residual is not None,
                                  GATE=gate is not None, NORM=norm, MODULATE=modulate,
                                  HAS_W=a is not None, HAS_B=b is not None,
                                  AMAX=amax_to is not None, FMAX=FP8_E4M3_MAX,
                                  ROWS=(1 if out_dtype == torch.bfloat16 else 2) if fp8_rows else 0,
                                  BLOCK=block, num_warps=_norm_warps(block, fp8_rows))
    return (y, scales) if fp8_rows else y


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    """fp32 LayerNorm over the last dim (optional affine) written in out_dtype."""
    return _launch_ln(x, out_dtype, eps, weight, bias, False)


def modulated_layer_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                         out_dtype: torch.dtype, eps: float,
                         amax_to: torch.Tensor | None = None, fp8_rows: bool = False):
    """x [B, L, C] -> LayerNorm(x) (no affine, fp32) * (1 + scale) + shift in out_dtype, with
    shift/scale [B, 1, C] (views into the modulation tensor are fine: unit last stride).
    `amax_to`, `fp8_rows`: see the module docstring."""
    shift, scale, hb, sb = _broadcast_rows(x, shift, scale)
    return _launch_ln(x, out_dtype, eps, scale, shift, True, sb, hb, x.shape[1], amax_to=amax_to,
                      fp8_rows=fp8_rows)


def _broadcast_rows(x, *ts):
    """Each [B, 1, C] / [1, 1, C] tensor t as rows [B or 1, C] with a unit last stride, then the
    row strides (0 where one row broadcasts over the batch)."""
    if x.dim() != 3:
        raise ValueError(f"x must be [B, L, C], got {tuple(x.shape)}")
    bsz, _, c = x.shape
    rows = []
    for t in ts:
        if t.shape[-1] != c or t.numel() != bsz * c and t.numel() != c:
            raise ValueError(f"{tuple(t.shape)} does not broadcast over x {tuple(x.shape)}")
        rows.append(_rows(t))
    return (*rows, *(t.stride(0) if t.shape[0] > 1 else 0 for t in rows))


def gated_residual_(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None = None) -> torch.Tensor:
    """x += y * gate (or x += y) in place, in one pass: x fp32 [B, L, C] (contiguous), y [B, L, C]
    in any float dtype, gate fp32 [B, 1, C] or None. Returns x. Same values as
    `x.addcmul_(y, gate)` / `x.add_(y)` (fp32 math; up to one rounding where the product and sum
    fuse into an fma)."""
    residual_layer_norm(x, y, gate, None, norm=False)
    return x


def residual_layer_norm(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None,
                        out_dtype: torch.dtype | None, eps: float = 1e-6,
                        weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                        shift: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                        inplace: bool = True, norm: bool = True,
                        amax_to: torch.Tensor | None = None, fp8_rows: bool = False):
    """The residual update of `gated_residual_` and the LayerNorm of its result in one pass:
    returns (x_new, h) with x_new = x + y [* gate] (x itself when inplace, else a new contiguous
    tensor, x untouched) and h = LayerNorm(x_new) in out_dtype, either affine (weight/bias) or
    modulated (`* (1 + scale) + shift`, [B, 1, C], as `modulated_layer_norm`). `amax_to`,
    `fp8_rows` (h is then (fp8, row scales)): see the module docstring."""
    if x.dtype != torch.float32 or y.shape != x.shape:
        raise ValueError(f"x must be fp32 and y of its shape: {x.dtype} {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    if inplace and not x.is_contiguous():
        raise ValueError("in-place residual update needs a contiguous x")
    x_out = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gate_args = () if gate is None else _broadcast_rows(x, gate)
    modulate = shift is not None
    if modulate:
        if weight is not None or bias is not None or scale is None:
            raise ValueError("modulation takes shift and scale and no affine weight/bias")
        scale, shift, sb, hb = _broadcast_rows(x, scale, shift)
        a, b = scale, shift
    else:
        a, b, sb, hb = weight, bias, 0, 0
    h = _launch_ln(x, out_dtype, eps, a, b, modulate, sb, hb, x.shape[1] if x.dim() == 3 else 1,
                   residual=y, gate=gate_args[0] if gate_args else None,
                   x_out=x_out, norm=norm, amax_to=amax_to, fp8_rows=fp8_rows)
    return x_out, h
