"""Triton kernels of the 8-bit attention (wanvideo/attention_int8.py is the entry point and says
what the numbers mean). This module imports triton at the top, so only attention_int8._kernels()
imports it, the first time a kernel is needed.

Rounding to INT8 uses the float trick x + 1.5 * 2**23: for |x| < 2**22 the sum is an integer
rounded half to even (torch.round's rule) and its low mantissa byte is that integer's two's
complement byte, so a bitcast and a truncation give the int8 without a float-to-int conversion
(the conversion unit is as slow as exp2, which already bounds the softmax). Scales divide with
div_rn (IEEE), as the reference does: an approximate division moves x.5 roundings.
"""
from __future__ import annotations

import triton
import triton.language as tl

MAGIC = 12582912.0  # 1.5 * 2**23


@triton.jit
def _to_int8(x, scale):
    """x * scale in [-127.5, 127.5] -> int8, the exact product rounded half to even. One explicit
    FMA, so the product is never rounded on its own (ptxas would fuse a plain mul + add anyway,
    and the reference must know which of the two happens)."""
    t = tl.fma(x, scale, 12582912.0)
    return t.to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _quant_kv_kernel(K, V, K_MEAN, V_INV, K_INT, K_SCALE, V_T, keys, padded, heads,
                     s_kb, s_kl, s_kh, s_vb, s_vl, s_vh,
                     D: tl.constexpr, BLOCK_N: tl.constexpr):
    """One block of BLOCK_N keys of one (batch, head): K - mean -> int8 with one scale,
    V * (127 / amax per channel) -> int8 stored transposed (keys contiguous)."""
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows = blk * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    valid = rows[:, None] < keys
    rows64 = rows[:, None].to(tl.int64)
    k = tl.load(K + b * s_kb + h * s_kh + rows64 * s_kl + d[None, :], mask=valid, other=0.0)
    mean = tl.load(K_MEAN + bh * D + d)
    # rows past the end become zero so they cannot enlarge the block's scale
    k = tl.where(valid, k.to(tl.float32) - mean[None, :], 0.0)
    amax = tl.max(tl.max(tl.abs(k), axis=1), axis=0)
    inv = tl.where(amax > 0, tl.math.div_rn(127.0, amax), 0.0)
    base = bh.to(tl.int64) * padded * D
    tl.store(K_INT + base + rows[:, None] * D + d[None, :], _to_int8(k, inv))
    tl.store(K_SCALE + bh * (padded // BLOCK_N) + blk, tl.math.div_rn(amax, 127.0))
    v = tl.load(V + b * s_vb + h * s_vh + rows64 * s_vl + d[None, :], mask=valid, other=0.0)
    v_int = _to_int8(v.to(tl.float32), tl.load(V_INV + bh * D + d)[None, :])
    tl.store(V_T + base + d[:, None] * padded + rows[None, :], tl.trans(v_int))


def quantize_kv(k, v, k_mean, v_inv, k_int, k_scale, v_t, block_n: int) -> None:
    b, keys, h, d = k.shape
    padded = k_int.shape[1]
    grid = (padded // block_n, b * h)
    _quant_kv_kernel[grid](k, v, k_mean, v_inv, k_int, k_scale, v_t, keys, padded, h,
                           k.stride(0), k.stride(1), k.stride(2),
                           v.stride(0), v.stride(1), v.stride(2),
                           D=d, BLOCK_N=block_n, num_warps=4)


@triton.jit
def _key_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, vt_ptrs, k_scale, cols, keys,
               MASKED: tl.constexpr):
    """One key block of the online softmax: exact int32 scores, fp32 log2-domain softmax with the
    block's own row max, INT8 P, exact int32 P.V folded into the fp32 accumulator."""
    k = tl.load(k_ptrs)
    s = tl.dot(q_int, tl.trans(k), out_dtype=tl.int32).to(tl.float32)
    s = s * (q_scale * k_scale)[:, None]
    if MASKED:
        s = tl.where(cols[None, :] < keys, s, float("-inf"))
    m_block = tl.max(s, axis=1)
    m_new = tl.maximum(m_i, m_block)
    alpha = tl.math.exp2(m_i - m_new)
    p_scale = tl.math.exp2(m_block - m_new)
    t = tl.fma(tl.math.exp2(s - m_block[:, None]), 127.0, 12582912.0)
    p_int = t.to(tl.int32, bitcast=True).to(tl.int8)
    l_i = l_i * alpha + p_scale * tl.sum(t - 12582912.0, axis=1)
    v_t = tl.load(vt_ptrs)
    pv = tl.dot(p_int, tl.trans(v_t), out_dtype=tl.int32).to(tl.float32)
    acc = acc * alpha[:, None] + pv * p_scale[:, None]
    return acc, m_new, l_i


@triton.jit
def _attn_kernel(Q, K_INT, K_SCALE, V_T, V_SCALE, O, n_q, keys, padded, heads, factor,
                 s_qb, s_ql, s_qh, s_ob, s_ol, s_oh,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows[:, None].to(tl.int64)
    d = tl.arange(0, D)
    in_q = rows[:, None] < n_q
    q = tl.load(Q + b * s_qb + h * s_qh + rows64 * s_ql + d[None, :], mask=in_q, other=0.0)
    q = q.to(tl.float32)
    q_amax = tl.max(tl.abs(q), axis=1)
    q_int = _to_int8(q, tl.where(q_amax > 0, tl.math.div_rn(127.0, q_amax), 0.0)[:, None])
    q_scale = q_amax * factor
    cols = tl.arange(0, BLOCK_N)
    base = bh.to(tl.int64) * padded * D
    k_ptrs = K_INT + base + cols[:, None] * D + d[None, :]
    vt_ptrs = V_T + base + d[:, None] * padded + cols[None, :]
    ks_ptr = K_SCALE + bh * (padded // BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    full = keys // BLOCK_N
    for j in range(0, full):
        acc, m_i, l_i = _key_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, vt_ptrs,
                                   tl.load(ks_ptr + j), cols, keys, False)
        k_ptrs += BLOCK_N * D
        vt_ptrs += BLOCK_N
    if full * BLOCK_N < keys:
        acc, m_i, l_i = _key_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, vt_ptrs,
                                   tl.load(ks_ptr + full), cols + full * BLOCK_N, keys, True)
    out = acc / l_i[:, None] * tl.load(V_SCALE + bh * D + d)[None, :]
    o_ptrs = O + b * s_ob + h * s_oh + rows64 * s_ol + d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=in_q)


def attention(q, k_int, k_scale, v_t, v_scale, out, keys: int, factor: float, *, block_m: int,
              block_n: int, num_warps: int, num_stages: int) -> None:
    b, n_q, h, d = q.shape
    grid = (triton.cdiv(n_q, block_m), b * h)
    _attn_kernel[grid](q, k_int, k_scale, v_t, v_scale, out, n_q, keys, k_int.shape[1], h, factor,
                       q.stride(0), q.stride(1), q.stride(2),
                       out.stride(0), out.stride(1), out.stride(2),
                       D=d, BLOCK_M=block_m, BLOCK_N=block_n,
                       num_warps=num_warps, num_stages=num_stages)
