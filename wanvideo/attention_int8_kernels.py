"""Triton kernels of the 8-bit attention (wanvideo/attention_int8.py is the entry point and says
what the numbers mean). This module imports triton at the top, so only attention_int8._kernels()
imports it, the first time a kernel is needed.

Rounding to INT8 uses the float trick x + 1.5 * 2**23: for |x| < 2**22 the sum is an integer
rounded half to even (torch.round's rule) and its low mantissa byte is that integer's two's
complement byte, so a bitcast and a truncation give the int8 without a float-to-int conversion
(the conversion unit is as slow as exp2, which already bounds the softmax). Scales divide with
div_rn (IEEE), as the reference does: an approximate division moves x.5 roundings.

Written for Triton 3.0 through 3.8: the int8 tl.dot names out_dtype=tl.int32 (before 3.8 an
accumulator must match out_dtype, whose default is float32), tl.sum gets no dtype= (3.0-3.2 lack
it), and there is no `from __future__ import annotations` (Triton 3.0's interpreter recognizes a
constexpr parameter only by a real tl.constexpr annotation). aot_compile compiles without a GPU.
"""
import functools
import inspect

import triton
import triton.language as tl

MAGIC = 12582912.0  # 1.5 * 2**23
# Lazy rescaling (config "lazy"): the reference max of a row moves only when a block's max exceeds
# it by more than this many log2 units, so most blocks skip the accumulator rescale. P stays
# relative to the block's own max (<= 127 as INT8), only its fp32 block weight may reach 2**8.
LAZY_THRESHOLD = 8.0


@functools.lru_cache(maxsize=None)
def range_options() -> frozenset:
    """tl.range's loop options in the installed Triton (warp_specialize, loop_unroll_factor:
    3.4+); a config that needs one this release lacks is refused by unsupported()."""
    return frozenset(inspect.signature(tl.range.__init__).parameters) - {"self"}


@functools.lru_cache(maxsize=None)
def ws_pass_below_sm100() -> bool:
    """Whether the installed Triton's NVIDIA backend runs its automatic warp-specialization pass
    for sm_8x/9x. In 3.6 and 3.8 make_ttgir adds it only in the `capability // 10 >= 10` branch,
    so on Hopper tl.range(warp_specialize=True) compiles to the very PTX of the plain loop (seen
    for pointer and descriptor loads): timing it would only repeat the ws=False figure. When the
    source cannot be read, assume it does (the bench then measures it)."""
    try:
        from triton.backends.nvidia.compiler import CUDABackend
        source = inspect.getsource(CUDABackend.make_ttgir)
    except Exception:  # noqa: BLE001 - another backend layout: let the GPU decide
        return True
    parts = source.split("capability // 10 in [8, 9]", 1)
    return len(parts) < 2 or "warp_specialize" in parts[1].split("elif", 1)[0]



def unsupported(config: dict, capability: int | None = None) -> str | None:
    """None when the installed Triton can build `config`'s loop options (for sm_`capability`,
    e.g. 90, when given), otherwise why not."""
    needs = {"warp_specialize": config.get("ws", False),
             "loop_unroll_factor": config.get("unroll", 1) > 1}
    missing = [name for name, used in needs.items() if used and name not in range_options()]
    if missing:
        return f"Triton {triton.__version__}'s tl.range has no {', '.join(missing)}"
    if config.get("ws", False) and capability is not None and capability < 100 \
            and not ws_pass_below_sm100():
        return (f"ws is a no-op on sm_{capability}: Triton {triton.__version__} runs its warp "
                "specialization pass only for sm_100+ (same PTX as ws=False)")
    if config.get("lazy", False) and config.get("pv", "int8") != "int8":
        # bf16 P is exp2(s - m_new): a stale m_new changes its bf16 roundings (1e-3 rel off the
        # reference under the interpreter, not the reference's numerics any more)
        return "lazy rescaling is for pv='int8' only (its P does not depend on the row max)"
    if config.get("tma", False):
        if not hasattr(tl, "make_tensor_descriptor") or not hasattr(triton, "set_allocator"):
            return f"Triton {triton.__version__} has no device-side tensor descriptors"
        if config.get("pv", "int8") != "int8":
            return "tma is for pv='int8' only (the bf16 path reads V in place, any strides)"
    if config.get("ws", False) and config.get("unroll", 1) > 1:
        return "ws and unroll > 1 are not combined (one tl.range option at a time)"
    return None


@triton.jit
def _to_int8(x, scale):
    """x * scale in [-127.5, 127.5] -> int8, the exact product rounded half to even. One explicit
    FMA, so the product is never rounded on its own (ptxas would fuse a plain mul + add anyway,
    and the reference must know which of the two happens)."""
    t = tl.fma(x, scale, 12582912.0)
    return t.to(tl.int32, bitcast=True).to(tl.int8)


@triton.jit
def _quant_kv_kernel(K, V, K_MEAN, V_INV, K_INT, K_SCALE, V_T, K_NORM, keys, padded, heads,
                     s_kb, s_kl, s_kh, s_vb, s_vl, s_vh,
                     D: tl.constexpr, BLOCK_N: tl.constexpr, QUANT_V: tl.constexpr,
                     SWIZZLE_KEYS: tl.constexpr = False, COPY_V: tl.constexpr = False,
                     TRANSPOSE_V: tl.constexpr = False, NORMS: tl.constexpr = False):
    """One block of BLOCK_N keys of one (batch, head): K - mean -> int8 with one scale, and
    (QUANT_V) V * (127 / amax per channel) -> int8 stored transposed (keys contiguous).
    SWIZZLE_KEYS: V^T's keys in the Gluon kernel's operand order (attention_int8_gluon:
    key 16g + 8i + 2t + e of a block at column 16g + 4t + 2i + e). COPY_V (not QUANT_V): V
    copied as bf16 into V_T laid out like K (the Gluon kernel's bf16 P.V reads it by TMA), or
    with TRANSPOSE_V as bf16 V^T [B*H, D, padded] (the CUDA kernel's K-major P.V operand).
    NORMS: the block's largest |int8 key row| * scale into K_NORM (exact squares in fp32)."""
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
    k_int, k_scale = _to_int8(k, inv), tl.math.div_rn(amax, 127.0)
    tl.store(K_INT + base + rows[:, None] * D + d[None, :], k_int)
    tl.store(K_SCALE + bh * (padded // BLOCK_N) + blk, k_scale)
    if NORMS:
        kf = k_int.to(tl.float32)
        norm = tl.sqrt(tl.max(tl.sum(kf * kf, axis=1), axis=0))
        tl.store(K_NORM + bh * (padded // BLOCK_N) + blk, norm * k_scale)
    if QUANT_V:
        v = tl.load(V + b * s_vb + h * s_vh + rows64 * s_vl + d[None, :], mask=valid, other=0.0)
        v_int = _to_int8(v.to(tl.float32), tl.load(V_INV + bh * D + d)[None, :])
        cols = rows
        if SWIZZLE_KEYS:
            cols = (rows & ~15) | (((rows >> 3) & 1) << 1) | (((rows >> 1) & 3) << 2) | (rows & 1)
        tl.store(V_T + base + d[:, None] * padded + cols[None, :], tl.trans(v_int))
    elif COPY_V:  # bf16 P.V in Gluon: V as bf16 [B*H, padded, D], zero rows past the end
        v = tl.load(V + b * s_vb + h * s_vh + rows64 * s_vl + d[None, :], mask=valid, other=0.0)
        if TRANSPOSE_V:
            tl.store(V_T + base + d[:, None] * padded + rows[None, :], tl.trans(v.to(tl.bfloat16)))
        else:
            tl.store(V_T + base + rows[:, None] * D + d[None, :], v.to(tl.bfloat16))


def quantize_kv(k, v, k_mean, v_inv, k_int, k_scale, v_t, block_n: int,
                swizzle_keys: bool = False, transpose_v: bool = False, k_norm=None) -> None:
    """`v_t` None: K only (the bf16 P.V variant reads V as it is). `swizzle_keys`: V^T in the
    Gluon kernel's key order. A bf16 `v_t` shaped like `k_int`: V copied there (Gluon, bf16);
    with `transpose_v` a bf16 `v_t` [B*H, D, padded]: V^T (the CUDA kernel). `k_norm` (fp32,
    shaped like `k_scale`): each block's largest key norm, |K int8 row| * scale."""
    b, keys, h, d = k.shape
    padded = k_int.shape[1]
    grid = (padded // block_n, b * h)
    copy_v = v_t is not None and v_t.dtype != k_int.dtype
    quant_v = v_t is not None and not copy_v
    _quant_kv_kernel[grid](k, v, k_mean, v_inv if quant_v else k_mean, k_int, k_scale,
                           k_int if v_t is None else v_t, k_scale if k_norm is None else k_norm,
                           keys, padded, h, *k.stride()[:3], *v.stride()[:3],
                           D=d, BLOCK_N=block_n, QUANT_V=quant_v,
                           SWIZZLE_KEYS=bool(swizzle_keys), COPY_V=copy_v,
                           TRANSPOSE_V=copy_v and transpose_v, NORMS=k_norm is not None,
                           num_warps=4)


@triton.jit
def _block_scores(q_int, q_scale, k_ptrs, k_off, k_scale, cols, keys, m_i,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                  LAZY: tl.constexpr, TMA: tl.constexpr):
    """Exact int32 scores of one key block, read as floats 1.5 * 2**23 + n: the product starts
    from an accumulator holding those bits, so no int-to-float conversion is needed (that unit
    is as slow as exp2's); |n| < 2**21 keeps it exact. Returns (f, f_max, c, m_block, m_new):
    the block's row max in the log2 domain is m_block = n_max * c, c = qscale * kscale. LAZY:
    m_new keeps the old max unless the block's exceeds it by more than LAZY_THRESHOLD (the first
    block always sets it: -inf + 8 is -inf). TMA: k_ptrs is a tensor descriptor, k_off the
    block's first key."""
    if TMA:
        k = k_ptrs.load([k_off, 0])
    else:
        k = tl.load(k_ptrs)
    magic = tl.full([BLOCK_M, BLOCK_N], 0x4B400000, tl.int32)
    f = tl.dot(q_int, tl.trans(k), acc=magic, out_dtype=tl.int32).to(tl.float32, bitcast=True)
    if MASKED:
        f = tl.where(cols[None, :] < keys, f, float("-inf"))
    f_max = tl.max(f, axis=1)
    c = q_scale * k_scale
    m_block = (f_max - 12582912.0) * c
    if LAZY:
        m_new = tl.where(m_block > m_i + 8.0, m_block, m_i)  # 8.0: LAZY_THRESHOLD
    else:
        m_new = tl.maximum(m_i, m_block)
    return f, f_max, c, m_block, m_new


@triton.jit
def _exp2_block(f, c, shift, cols, keys, MASKED: tl.constexpr):
    """exp2(f * c + shift), one FMA and exp2 per score (the reference emulates the FMA)."""
    x = tl.fma(f, c[:, None], shift[:, None])
    if MASKED:  # c may be 0 (an all-zero query row): -inf * 0 would be NaN
        x = tl.where(cols[None, :] < keys, x, float("-inf"))
    return tl.math.exp2(x)


@triton.jit
def _int8_pv_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, vt_ptrs, k_off, k_scale, cols, keys,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                   MASKED: tl.constexpr, LAZY: tl.constexpr, TMA: tl.constexpr):
    """One key block, INT8 P.V: P = round(127 * exp2(s - m_block)) per row of the block, an exact
    int32 product with V (read as floats like the scores), weighted by exp2(m_block - m_new).
    P never depends on m_new, so LAZY changes only fp32 roundings of the block weights (which
    reach 2**8 at most), not the integers."""
    f, f_max, c, m_block, m_new = _block_scores(q_int, q_scale, k_ptrs, k_off, k_scale, cols,
                                                keys, m_i, BLOCK_M, BLOCK_N, MASKED, LAZY, TMA)
    alpha = tl.math.exp2(m_i - m_new)
    p_scale = tl.math.exp2(m_block - m_new)
    p = _exp2_block(f, c, -(f_max * c), cols, keys, MASKED)
    bits = tl.fma(p, 127.0, 12582912.0).to(tl.int32, bitcast=True)
    # sum of the integers: every element carries 0x4B400000, removed once per row (int32 wraps)
    offset = tl.full([BLOCK_M], 0x4B400000, tl.int32) * BLOCK_N
    l_block = tl.sum(bits, axis=1) - offset  # int32 in, int32 out (no dtype=: Triton <= 3.2)
    l_i = l_i * alpha + p_scale * l_block.to(tl.float32)
    if TMA:
        v_t = vt_ptrs.load([0, k_off])
    else:
        v_t = tl.load(vt_ptrs)
    magic = tl.full([BLOCK_M, D], 0x4B400000, tl.int32)
    pv = tl.dot(bits.to(tl.int8), tl.trans(v_t), acc=magic, out_dtype=tl.int32)
    pv = pv.to(tl.float32, bitcast=True)
    if LAZY:
        acc = _rescale_if_moved(acc, alpha, m_i, m_new)
        acc = acc + (pv - 12582912.0) * p_scale[:, None]
    else:
        acc = acc * alpha[:, None] + (pv - 12582912.0) * p_scale[:, None]
    return acc, m_new, l_i


@triton.jit
def _bf16_pv_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, v_ptrs, k_scale, cols, keys,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                   LAZY: tl.constexpr):
    """One key block, bf16 P.V (SageAttention 1's choice): P = exp2(s - m_new) rounded to bf16,
    V as given (cast to bf16), the product accumulated in fp32 by the tensor cores. LAZY
    compiles (P up to 2**8) but unsupported() refuses it: P's bf16 roundings would move."""
    f, f_max, c, m_block, m_new = _block_scores(q_int, q_scale, k_ptrs, 0, k_scale, cols, keys,
                                                m_i, BLOCK_M, BLOCK_N, MASKED, LAZY, False)
    alpha = tl.math.exp2(m_i - m_new)
    p = _exp2_block(f, c, (m_block - m_new) - f_max * c, cols, keys, MASKED)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if MASKED:
        v = tl.load(v_ptrs, mask=cols[:, None] < keys, other=0.0)
    else:
        v = tl.load(v_ptrs)
    if LAZY:
        acc = _rescale_if_moved(acc, alpha, m_i, m_new)
    else:
        acc = acc * alpha[:, None]
    acc = tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16), acc=acc)
    return acc, m_new, l_i


@triton.jit
def _rescale_if_moved(acc, alpha, m_i, m_new):
    """acc * alpha only when some row of the tile moved its max: a tile-wide branch (one
    reduction) in place of BLOCK_M * D multiplies per block. Rows that did not move have
    alpha = exp2(0) = 1 exactly, so multiplying them too changes nothing."""
    moved = tl.max((m_new != m_i).to(tl.int32), axis=0)
    if moved != 0:
        acc = acc * alpha[:, None]
    return acc


@triton.jit
def _key_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, v_ptrs, k_off, k_scale, cols, keys,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
               PV_INT8: tl.constexpr, MASKED: tl.constexpr, LAZY: tl.constexpr,
               TMA: tl.constexpr):
    if PV_INT8:
        acc, m_i, l_i = _int8_pv_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, v_ptrs, k_off,
                                       k_scale, cols, keys, BLOCK_M, BLOCK_N, D, MASKED, LAZY,
                                       TMA)
    else:
        acc, m_i, l_i = _bf16_pv_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, v_ptrs, k_scale,
                                       cols, keys, BLOCK_M, BLOCK_N, MASKED, LAZY)
    return acc, m_i, l_i


@triton.jit
def _query_tile(q_ptrs, in_q, factor):
    """One tile of queries as per-row INT8 (q_int) and its scales times `factor` (q_scale)."""
    q = tl.load(q_ptrs, mask=in_q, other=0.0).to(tl.float32)
    q_amax = tl.max(tl.abs(q), axis=1)
    q_int = _to_int8(q, tl.where(q_amax > 0, tl.math.div_rn(127.0, q_amax), 0.0)[:, None])
    return q_int, q_amax * factor


@triton.jit
def _kv_tiles(K_INT, V, base, b, h, s_vb, s_vh, s_vl, cols, d, padded,
              BLOCK_N: tl.constexpr, D: tl.constexpr, PV_INT8: tl.constexpr, TMA: tl.constexpr):
    """Where one (batch, head)'s first key block is read: (K, V or V^T, V's step per block).
    `base`: the head's offset in the INT8 K and transposed INT8 V (zero-padded to `padded` keys);
    bf16 P.V reads the input V. TMA: tensor descriptors (whole blocks, so no bounds)."""
    k_ptrs = K_INT + base + cols[:, None] * D + d[None, :]
    if TMA:
        k_ptrs = tl.make_tensor_descriptor(K_INT + base, shape=[padded, D], strides=[D, 1],
                                           block_shape=[BLOCK_N, D])
        v_ptrs = tl.make_tensor_descriptor(V + base, shape=[D, padded], strides=[padded, 1],
                                           block_shape=[D, BLOCK_N])
        v_step = 0
    elif PV_INT8:
        v_ptrs = V + base + d[:, None] * padded + cols[None, :]
        v_step = BLOCK_N
    else:
        v_ptrs = V + b * s_vb + h * s_vh + cols[:, None].to(tl.int64) * s_vl + d[None, :]
        v_step = BLOCK_N * s_vl
    return k_ptrs, v_ptrs, v_step


@triton.jit
def _store_tile(O, acc, l_i, V_SCALE, b, h, bh, s_ob, s_oh, s_ol, rows64, d, in_q,
                D: tl.constexpr, PV_INT8: tl.constexpr):
    """The normalised output tile (times V's per-channel scales for INT8 P.V) in O's dtype."""
    out = acc / l_i[:, None]
    if PV_INT8:
        out = out * tl.load(V_SCALE + bh * D + d)[None, :]
    tl.store(O + b * s_ob + h * s_oh + rows64 * s_ol + d[None, :], out.to(O.dtype.element_ty),
             mask=in_q)


# _attn_kernel: V is the INT8 transposed copy [B*H, D, padded] when PV_INT8, else the input V.
# The grid is (query tiles, batch * heads) with the query tiles fastest, so the CTAs resident at
# one time share one head's K/V (a few MB of INT8) in L2. The full key blocks run unmasked; the
# partial last one is peeled off the loop. WS / UNROLL pick tl.range options for that loop (only
# the taken branch is compiled, so releases without them build the plain loop). TMA (INT8 P.V):
# K and V^T tiles come through device-side tensor descriptors, one TMA copy per tile in place of
# each thread's cp.async of 16 bytes and its address arithmetic (issue slots are what this loop
# is short of), and the loads Triton's automatic warp specialization moves to a producer warp
# where it runs (sm_100+ in 3.6 and 3.8: see unsupported()).
@triton.jit
def _attn_kernel(Q, K_INT, K_SCALE, V, V_SCALE, O, n_q, keys, padded, heads, factor,
                 s_qb, s_ql, s_qh, s_vb, s_vl, s_vh, s_ob, s_ol, s_oh,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 PV_INT8: tl.constexpr, WS: tl.constexpr, LAZY: tl.constexpr,
                 UNROLL: tl.constexpr, TMA: tl.constexpr):
    """One (query tile, batch * head) program; see the comment above for the layout."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // heads).to(tl.int64)
    h = bh % heads
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows64 = rows[:, None].to(tl.int64)
    d = tl.arange(0, D)
    in_q = rows[:, None] < n_q
    q_int, q_scale = _query_tile(Q + b * s_qb + h * s_qh + rows64 * s_ql + d[None, :], in_q,
                                 factor)
    cols = tl.arange(0, BLOCK_N)
    base = bh.to(tl.int64) * padded * D
    k_ptrs, v_ptrs, v_step = _kv_tiles(K_INT, V, base, b, h, s_vb, s_vh, s_vl, cols, d, padded,
                                       BLOCK_N, D, PV_INT8, TMA)
    ks_ptr = K_SCALE + bh * (padded // BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    full = keys // BLOCK_N
    if WS:
        for j in tl.range(0, full, warp_specialize=True):
            acc, m_i, l_i = _key_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, v_ptrs, j * BLOCK_N,
                                       tl.load(ks_ptr + j), cols, keys, BLOCK_M, BLOCK_N, D,
                                       PV_INT8, False, LAZY, TMA)
            if not TMA:
                k_ptrs += BLOCK_N * D
                v_ptrs += v_step
    elif UNROLL > 1:
        for j in tl.range(0, full, loop_unroll_factor=UNROLL):
            acc, m_i, l_i = _key_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, v_ptrs, j * BLOCK_N,
                                       tl.load(ks_ptr + j), cols, keys, BLOCK_M, BLOCK_N, D,
                                       PV_INT8, False, LAZY, TMA)
            if not TMA:
                k_ptrs += BLOCK_N * D
                v_ptrs += v_step
    else:
        for j in range(0, full):
            acc, m_i, l_i = _key_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, v_ptrs, j * BLOCK_N,
                                       tl.load(ks_ptr + j), cols, keys, BLOCK_M, BLOCK_N, D,
                                       PV_INT8, False, LAZY, TMA)
            if not TMA:
                k_ptrs += BLOCK_N * D
                v_ptrs += v_step
    if full * BLOCK_N < keys:
        acc, m_i, l_i = _key_block(acc, m_i, l_i, q_int, q_scale, k_ptrs, v_ptrs, full * BLOCK_N,
                                   tl.load(ks_ptr + full), cols + full * BLOCK_N, keys, BLOCK_M,
                                   BLOCK_N, D, PV_INT8, True, LAZY, TMA)
    _store_tile(O, acc, l_i, V_SCALE, b, h, bh, s_ob, s_oh, s_ol, rows64, d, in_q, D, PV_INT8)


def launch_facts(kernel) -> dict:
    """Registers, spills and shared memory of a launched kernel (n_regs, n_spills,
    metadata.shared; empty under the interpreter): the occupancy facts behind a timing."""
    facts = {name: getattr(kernel, name, None) for name in ("n_regs", "n_spills")}
    facts["shared"] = getattr(getattr(kernel, "metadata", None), "shared", None)
    return {name: value for name, value in facts.items() if isinstance(value, int)}


def attention(q, k_int, k_scale, v, v_scale, out, keys: int, factor: float, *, pv: str,
              block_m: int, block_n: int, num_warps: int, num_stages: int, ws: bool = False,
              lazy: bool = False, unroll: int = 1, tma: bool = False, gluon: bool = False):
    """`v`: quantize_kv's transposed INT8 V for pv="int8", the input V for pv="bf16". Returns
    the launched kernel."""
    reason = unsupported(dict(pv=pv, ws=ws, lazy=lazy, unroll=unroll, tma=tma))
    if reason:
        raise RuntimeError(reason)
    if tma:
        _set_scratch_allocator()
    b, n_q, h, d = q.shape
    grid = (triton.cdiv(n_q, block_m), b * h)
    v_strides = (0, 0, 0) if pv == "int8" else (v.stride(0), v.stride(1), v.stride(2))
    return _attn_kernel[grid](q, k_int, k_scale, v, v_scale, out, n_q, keys, k_int.shape[1], h, factor,
                       q.stride(0), q.stride(1), q.stride(2), *v_strides,
                       out.stride(0), out.stride(1), out.stride(2),
                       D=d, BLOCK_M=block_m, BLOCK_N=block_n, PV_INT8=pv == "int8",
                       WS=bool(ws), LAZY=bool(lazy), UNROLL=int(unroll), TMA=bool(tma),
                       num_warps=num_warps, num_stages=num_stages)


_ALLOCATOR_SET = []


def _set_scratch_allocator() -> None:
    """Device-side tensor descriptors live in global scratch memory that Triton asks the
    program's allocator for (once per process; torch's caching allocator serves it)."""
    if not _ALLOCATOR_SET:
        import torch

        def alloc(size: int, alignment: int, stream):
            return torch.empty(size, dtype=torch.int8, device="cuda")

        triton.set_allocator(alloc)
        _ALLOCATOR_SET.append(True)


def _signatures(pv: str, dtype: str) -> tuple[dict, dict]:
    """The runtime arguments of _quant_kv_kernel and _attn_kernel as triton.compile types."""
    quant = {"K": f"*{dtype}", "V": f"*{dtype}", "K_MEAN": "*fp32", "V_INV": "*fp32",
             "K_INT": "*i8", "K_SCALE": "*fp32", "V_T": "*i8", "K_NORM": "*fp32",
             "keys": "i32", "padded": "i32", "heads": "i32"}
    quant.update({f"s_{t}{s}": "i32" for t in "kv" for s in "blh"})
    attn = {"Q": f"*{dtype}", "K_INT": "*i8", "K_SCALE": "*fp32",
            "V": "*i8" if pv == "int8" else f"*{dtype}", "V_SCALE": "*fp32", "O": f"*{dtype}"}
    attn.update({name: "i32" for name in ("n_q", "keys", "padded", "heads")}, factor="fp32")
    attn.update({f"s_{t}{s}": "i32" for t in "qvo" for s in "blh"})
    return quant, attn


def aot_compile(capability: int, config: dict, head_dim: int = 128, dtype: str = "bf16"):
    """Both kernels of one launch `config` (attention_int8.launch_config's keys) compiled for
    sm_`capability` without a GPU (front end, backend passes, ptxas), the pointers and `padded`
    16-divisible as in a real launch (not on 3.2). Returns (quantize_kv, attention) compiled
    kernels (asm["ptx"], asm["cubin"], metadata.shared). Raises RuntimeError for a config
    unsupported() refuses."""
    reason = unsupported(config)
    if reason:
        raise RuntimeError(reason)
    quant_sig, attn_sig = _signatures(config["pv"], dtype)
    gluon, cuda = bool(config.get("gluon", False)), bool(config.get("cuda", False))
    int8, cuda_bf16 = config["pv"] == "int8", cuda and config["pv"] == "bf16"
    quant_consts = {"D": head_dim, "BLOCK_N": config["block_n"], "QUANT_V": int8,
                    "SWIZZLE_KEYS": (gluon or cuda) and int8, "COPY_V": (gluon or cuda) and not int8,
                    "TRANSPOSE_V": cuda_bf16, "NORMS": cuda_bf16}
    if (gluon or cuda) and config["pv"] == "bf16":
        quant_sig["V_T"] = "*bf16"
    quant = _compile(_quant_kv_kernel, quant_sig, quant_consts, capability, {"num_warps": 4})
    if cuda:  # NVRTC, not Triton: sm_90a only
        from . import attention_int8_cuda

        return quant, attention_int8_cuda.aot_compile(config)
    if gluon:
        from . import attention_int8_gluon

        return quant, attention_int8_gluon.aot_compile(capability, config, head_dim, dtype)
    attn = _compile(_attn_kernel, attn_sig,
                    {"D": head_dim, "BLOCK_M": config["block_m"], "BLOCK_N": config["block_n"],
                     "PV_INT8": config["pv"] == "int8", "WS": bool(config.get("ws", False)),
                     "LAZY": bool(config.get("lazy", False)),
                     "UNROLL": int(config.get("unroll", 1)),
                     "TMA": bool(config.get("tma", False))}, capability,
                    {"num_warps": config["num_warps"], "num_stages": config["num_stages"]})
    return quant, attn


def _compile(fn, sig: dict, consts: dict, capability: int, options: dict):
    """triton.compile of `fn`; ASTSource changed twice: argument indices (3.0-3.1), names with
    `constants` (3.2), names with `constexprs` and dict attributes (3.3+)."""
    from triton.backends.compiler import GPUTarget

    names = fn.arg_names
    aligned = [names.index(n) for n, t in sig.items() if t.startswith("*") or n == "padded"]
    source, version = triton.compiler.ASTSource, tuple(map(int, triton.__version__.split(".")[:2]))
    if version >= (3, 2):  # names; constexprs in the signature too
        sig = {**sig, **{name: "constexpr" for name in consts}}
    if version >= (3, 3):
        attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
        src = source(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    elif version == (3, 2):  # its AttrsDescriptor is built from launch arguments: unaligned
        src = source(fn=fn, signature=sig, constants=consts)
    else:
        attrs = triton.compiler.AttrsDescriptor(divisible_by_16=set(aligned))
        src = source(fn=fn, signature={names.index(n): t for n, t in sig.items()},
                     constants={names.index(n): v for n, v in consts.items()}, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
