"""The Hopper (sm_90) attention kernels in Gluon, Triton's explicit-layout dialect, with wgmma
issued asynchronously so the tensor cores can work under the softmax (config "gluon": True; the
bf16 one is Hopper's default: docs/ATTENTION_8BIT.md, "The Gluon kernels", has the figures).

Plain Triton waits for every wgmma right after issuing it. Here, per key block j:

    wait PV[j-1], fold it into acc (INT8) / rescale acc (bf16)
    issue S[j+1] = Q.K[j+1]^T                  (tensor cores)
    softmax of S[j] -> P[j]                    (CUDA cores, while S[j+1] runs)
    issue PV[j] = P[j].V[j]
    wait S[j+1]                                (PV[j] keeps running)

PV[j-1] is waited for before S[j+1] is issued: ptxas serializes every wgmma of the kernel when a
wait retires a group issued before the loop's back edge while a newer one is pending.

_attn_kernel (pv="int8") has the Triton kernel's numerics integer for integer (bit for bit on an
H200 with lazy rescaling on both sides): INT8 Q per token (quantized here from the input tile),
INT8 K per key block and V per channel from quantize_kv's zero-padded buffers, both products
exact in int32 read as floats 1.5 * 2**23 + n, P = round(127 * exp2(s - m_block)) per row and
block, the block weight exp2(m_block - m_ref) applied once per row in fp32. _attn_kernel_bf16
(pv="bf16") has the Triton bf16 variant's: P = exp2(s - m) and V in bf16, accumulated in fp32 by
the wgmma. So attention_8bit.kernel_reference holds both.

K and V tiles arrive by TMA into a ring of STAGES slots (an mbarrier per slot and operand; K one
block ahead of V, whose slot frees a step later). One warpgroup per CTA, 64 query rows, at most
255 registers, so two CTAs share an SM (two warpgroups, num_warps=8, run too, slower). This
module imports triton at the top: attention_int8 imports it only when a config asks for it.
"""
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma,
                                                                warpgroup_mma_init,
                                                                warpgroup_mma_wait)

MAGIC_BITS = gl.constexpr(0x4B400000)  # the bits of 1.5 * 2**23


@gluon.jit
def _to_int8(x, scale):
    """x * scale rounded half to even to int8 by one FMA with 1.5 * 2**23 and a bitcast."""
    t = gl.fma(x, scale, 12582912.0)
    return t.to(gl.int32, bitcast=True).to(gl.int8)


@gluon.jit
def _load_k(k_desc, k_smem, k_bars, row0, j, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
            SKIP: gl.constexpr = False):
    """TMA of key block j's K tile into slot j % STAGES. SKIP (diagnostics only): past the
    ring's first fill the slot keeps its old tile and the barrier is only arrived at."""
    slot = j % STAGES
    bar = k_bars.index(slot)
    if SKIP and j >= STAGES:
        mbarrier.arrive(bar)
        return
    mbarrier.expect(bar, k_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(k_desc, [row0 + j * BLOCK_N, 0], bar, k_smem.index(slot))


@gluon.jit
def _load_v(v_desc, v_smem, v_bars, row0, vrow0, j, STAGES: gl.constexpr,
            BLOCK_N: gl.constexpr, V_T: gl.constexpr, SKIP: gl.constexpr = False):
    """TMA of key block j's V tile (V_T: INT8 V^T [D, keys], else bf16 [keys, D]); SKIP as in
    _load_k."""
    slot = j % STAGES
    bar = v_bars.index(slot)
    if SKIP and j >= STAGES:
        mbarrier.arrive(bar)
        return
    mbarrier.expect(bar, v_desc.block_type.nbytes)
    if V_T:
        tma.async_copy_global_to_shared(v_desc, [vrow0, j * BLOCK_N], bar, v_smem.index(slot))
    else:
        tma.async_copy_global_to_shared(v_desc, [row0 + j * BLOCK_N, 0], bar, v_smem.index(slot))


@gluon.jit
def _ring(k_desc, v_desc, row0, vrow0, n_blocks, STAGES: gl.constexpr, BLOCK_N: gl.constexpr,
          V_T: gl.constexpr):
    """The TMA ring's shared memory and barriers, with its first loads issued. K runs one block
    further ahead than V: a K slot frees when its Q.K^T is done, a V slot only when its P.V is,
    one step later."""
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES] + k_desc.block_type.shape,
                                       k_desc.layout)
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape,
                                       v_desc.layout)
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    for i in gl.static_range(STAGES):
        if i < n_blocks:
            _load_k(k_desc, k_smem, k_bars, row0, i, STAGES, BLOCK_N)
            if i < STAGES - 1:
                _load_v(v_desc, v_smem, v_bars, row0, vrow0, i, STAGES, BLOCK_N, V_T)
    return k_smem, v_smem, k_bars, v_bars


@gluon.jit
def _release(k_bars, v_bars, STAGES: gl.constexpr):
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))


@gluon.jit
def _product_now(p, v_smem, v_bars, j, zero_o, STAGES: gl.constexpr):
    """The exact int32 P.V of block j, waited for (the last block: nothing left to overlap)."""
    slot = j % STAGES
    mbarrier.wait(v_bars.index(slot), (j // STAGES) & 1)
    return warpgroup_mma(p, v_smem.index(slot).permute((1, 0)), zero_o, use_acc=False)


@gluon.jit
def _issue_scores(q_op, k_smem, k_bars, j, zero_s, STAGES: gl.constexpr):
    """Q.K[j]^T as an asynchronous wgmma from the accumulator's 1.5 * 2**23 start value."""
    slot = j % STAGES
    mbarrier.wait(k_bars.index(slot), (j // STAGES) & 1)
    return warpgroup_mma(q_op, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                         is_async=True)


@gluon.jit
def _softmax(s, m_i, l_i, q_scale, k_scale, col0, keys, p_layout: gl.constexpr,
             s_layout: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr):
    """One key block's INT8 P (in the P.V operand layout), the new reference max, and the block's
    weights: (p, m_new, l_i, alpha, p_scale)."""
    f = (s + MAGIC_BITS).to(gl.float32, bitcast=True)
    if MASKED:
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        f = gl.where(cols[None, :] < keys, f, float("-inf"))
    f_max = gl.max(f, axis=1)
    c = q_scale * k_scale
    m_block = (f_max - 12582912.0) * c
    m_new = gl.where(m_block > m_i + 8.0, m_block, m_i)  # 8.0: attention_int8_kernels.LAZY_THRESHOLD
    alpha = gl.exp2(m_i - m_new)
    p_scale = gl.exp2(m_block - m_new)
    x = gl.fma(f, c[:, None], -(f_max * c)[:, None])
    if MASKED:  # c may be 0 (an all-zero query row): -inf * 0 would be NaN
        x = gl.where(cols[None, :] < keys, x, float("-inf"))
    bits = gl.fma(gl.exp2(x), 127.0, 12582912.0).to(gl.int32, bitcast=True)
    offset = gl.full([s.shape[0]], MAGIC_BITS, gl.int32, layout=gl.SliceLayout(1, s_layout))
    l_block = gl.sum(bits, axis=1) - offset * BLOCK_N
    l_i = l_i * alpha + p_scale * l_block.to(gl.float32)
    return _as_operand(bits.to(gl.int8), p_layout), m_new, l_i, alpha, p_scale


@gluon.jit
def _as_operand(p, p_layout: gl.constexpr):
    """P from the Q.K^T accumulator's registers to the P.V operand's, without moving a byte: a
    thread holds accumulator columns 8i + 2t + e of each 16 (t its lane in the quad) where the
    INT8 operand wants 4t + 2i + e. Relabelling P's columns that way (reshape, permute) makes
    the two layouts equal; quantize_kv stored V^T's keys in the same order
    (KEY_ORDER), so the sum over keys is unchanged."""
    m: gl.constexpr = p.shape[0]
    n: gl.constexpr = p.shape[1]
    p = gl.reshape(p, [m, n // 16, 2, 4, 2])          # (row, 16-column group, i, t, e)
    p = gl.permute(p, [0, 1, 3, 2, 4])                # (row, group, t, i, e)
    return gl.convert_layout(gl.reshape(p, [m, n]), p_layout, assert_trivial=True)


@gluon.jit
def _fold(acc, pv, alpha, p_scale, o_rows: gl.constexpr, LAZY: gl.constexpr):
    """acc * alpha (LAZY: only when some row's reference max moved, one CTA-wide reduction) +
    the block's exact int32 P.V times its weight."""
    alpha = gl.convert_layout(alpha, o_rows)
    p_scale = gl.convert_layout(p_scale, o_rows)
    if LAZY:
        moved = gl.max((alpha != 1.0).to(gl.int32), axis=0)
        if moved != 0:
            acc = acc * alpha[:, None]
    else:
        acc = acc * alpha[:, None]
    return acc + ((pv + MAGIC_BITS).to(gl.float32, bitcast=True) - 12582912.0) * p_scale[:, None]


@gluon.constexpr_function
def _mma_layout(num_warps, n, k):
    """The wgmma accumulator layout of one warpgroup's [64, n] tile, k-deep instructions (32 for
    8-bit operands, 16 for bf16)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                     instr_shape=[16, n, k])


@gluon.jit
def _program(Q, K_SCALE, n_q, keys, padded, heads, factor, s_qb, s_ql, s_qh,
             s_layout: gl.constexpr, io_layout: gl.constexpr, BLOCK_M: gl.constexpr,
             BLOCK_N: gl.constexpr, D: gl.constexpr):
    """Where this program works, and its queries as the Q.K^T operand: (b, h, bh, query tile,
    q_op, q_scale, first K row of the head, key blocks, the head's K scales)."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = (bh // heads).to(gl.int64)
    h = bh % heads
    q_op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=4)
    q_op, q_scale = _quantized_queries(Q, b, h, pid_m, n_q, factor, s_qb, s_ql, s_qh,
                                       q_op_layout, gl.SliceLayout(1, s_layout), io_layout,
                                       BLOCK_M, D)
    ks_ptr = K_SCALE + bh * (padded // BLOCK_N)
    return b, h, bh, pid_m, q_op, q_scale, bh * padded, gl.cdiv(keys, BLOCK_N), ks_ptr


@gluon.jit
def _quantized_queries(Q, b, h, pid_m, n_q, factor, s_qb, s_ql, s_qh,
                       q_op_layout: gl.constexpr, s_rows: gl.constexpr,
                       io_layout: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr):
    """The query tile as INT8 per row in the Q.K^T operand layout, and its row scales times
    `factor` (the log2 domain, 1/sqrt(D) and K's 1/127)."""
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    in_q = rows[:, None] < n_q
    q = gl.load(Q + b * s_qb + h * s_qh + rows[:, None].to(gl.int64) * s_ql + d[None, :],
                mask=in_q, other=0.0).to(gl.float32)
    q_amax = gl.max(gl.abs(q), axis=1)
    q_int = _to_int8(q, gl.where(q_amax > 0, gl.div_rn(127.0, q_amax), 0.0)[:, None])
    return gl.convert_layout(q_int, q_op_layout), gl.convert_layout(q_amax * factor, s_rows)


@gluon.jit
def _store_tile(O, acc, l_i, V_SCALE, b, h, bh, pid_m, n_q, s_ob, s_ol, s_oh,
                io_layout: gl.constexpr, BLOCK_M: gl.constexpr, D: gl.constexpr,
                V_SCALED: gl.constexpr = True):
    """acc / l (times V's channel scales: V_SCALED), in O's dtype, rows past n_q left alone."""
    l_i = gl.convert_layout(l_i, gl.SliceLayout(1, io_layout))
    out = gl.convert_layout(acc, io_layout) / l_i[:, None]
    rows = pid_m * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, io_layout))
    d = gl.arange(0, D, layout=gl.SliceLayout(0, io_layout))
    if V_SCALED:
        out = out * gl.load(V_SCALE + bh * D + d)[None, :]
    gl.store(O + b * s_ob + h * s_oh + rows[:, None].to(gl.int64) * s_ol + d[None, :],
             out.to(O.dtype.element_ty), mask=rows[:, None] < n_q)


@gluon.jit
def _loop_int8(acc, m_i, l_i, s, pv_tok, alpha_prev, ps_prev, q_op, q_scale, ks_ptr, keys,
               n_blocks, k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, row0, vrow0, zero_s,
               zero_o, p_layout: gl.constexpr, s_layout: gl.constexpr, o_rows: gl.constexpr,
               STAGES: gl.constexpr, BLOCK_N: gl.constexpr, LAZY: gl.constexpr):
    """Every key block but the last, INT8 P.V (the pipeline of the module docstring)."""
    for j in range(0, n_blocks - 1):
        # P.V of the previous block first: ptxas serializes every wgmma of the kernel when a
        # wait retires a group issued before the loop's back edge while a newer one is pending
        pv = warpgroup_mma_wait(num_outstanding=0, deps=(pv_tok,))
        # block j-1's V slot is free now that its P.V is done
        if j + STAGES - 1 < n_blocks:
            _load_v(v_desc, v_smem, v_bars, row0, vrow0, j + STAGES - 1, STAGES, BLOCK_N, True)
        acc = _fold(acc, pv, alpha_prev, ps_prev, o_rows, LAZY)
        s_next = _issue_scores(q_op, k_smem, k_bars, j + 1, zero_s, STAGES)
        p, m_i, l_i, alpha_prev, ps_prev = _softmax(s, m_i, l_i, q_scale, gl.load(ks_ptr + j),
                                                    j * BLOCK_N, keys, p_layout, s_layout,
                                                    BLOCK_N, False)
        slot = j % STAGES
        mbarrier.wait(v_bars.index(slot), (j // STAGES) & 1)
        pv_tok = warpgroup_mma(p, v_smem.index(slot).permute((1, 0)), zero_o, use_acc=False,
                               is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
        # block j's K slot is free: Q.K^T[j] finished an iteration ago
        if j + STAGES < n_blocks:
            _load_k(k_desc, k_smem, k_bars, row0, j + STAGES, STAGES, BLOCK_N)
    return acc, m_i, l_i, s, pv_tok, alpha_prev, ps_prev


@gluon.jit
def _attn_kernel(Q, k_desc, v_desc, K_SCALE, V_SCALE, O, n_q, keys, padded, heads, factor,
                 s_qb, s_ql, s_qh, s_ob, s_ol, s_oh,
                 STAGES: gl.constexpr, BLOCK_M: gl.constexpr, LAZY: gl.constexpr,
                 num_warps: gl.constexpr):
    """One (64-query tile, batch * head) program; the pipeline is in the module docstring."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N, 32)
    o_layout: gl.constexpr = _mma_layout(num_warps, D, 32)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    b, h, bh, pid_m, q_op, q_scale, row0, n_blocks, ks_ptr = _program(
        Q, K_SCALE, n_q, keys, padded, heads, factor, s_qb, s_ql, s_qh, s_layout, io_layout,
        BLOCK_M, BLOCK_N, D)
    vrow0 = bh * D
    k_smem, v_smem, k_bars, v_bars = _ring(k_desc, v_desc, row0, vrow0, n_blocks, STAGES,
                                           BLOCK_N, True)

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    zero_o = gl.zeros([BLOCK_M, D], gl.int32, layout=o_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=s_rows)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)
    alpha_prev = gl.full([BLOCK_M], 1.0, gl.float32, layout=s_rows)
    ps_prev = gl.zeros([BLOCK_M], gl.float32, layout=s_rows)
    s = _issue_scores(q_op, k_smem, k_bars, 0, zero_s, STAGES)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    # a "block -1" of zero weight in flight: every pass through the loop starts alike
    mbarrier.wait(v_bars.index(0), 0)
    pv_tok = warpgroup_mma(gl.zeros([BLOCK_M, BLOCK_N], gl.int8, layout=p_layout),
                           v_smem.index(0).permute((1, 0)), zero_o, use_acc=False, is_async=True)
    acc, m_i, l_i, s, pv_tok, alpha_prev, ps_prev = _loop_int8(
        acc, m_i, l_i, s, pv_tok, alpha_prev, ps_prev, q_op, q_scale, ks_ptr, keys, n_blocks,
        k_desc, v_desc, k_smem, v_smem, k_bars, v_bars, row0, vrow0, zero_s, zero_o,
        p_layout, s_layout, o_rows, STAGES, BLOCK_N, LAZY)

    # the last block, masked past `keys` (its columns are zero padding in K and V^T)
    last = n_blocks - 1
    pv = warpgroup_mma_wait(num_outstanding=0, deps=(pv_tok,))
    acc = _fold(acc, pv, alpha_prev, ps_prev, o_rows, LAZY)
    p, m_i, l_i, alpha, p_scale = _softmax(s, m_i, l_i, q_scale, gl.load(ks_ptr + last),
                                           last * BLOCK_N, keys, p_layout, s_layout, BLOCK_N,
                                           True)
    pv = _product_now(p, v_smem, v_bars, last, zero_o, STAGES)
    acc = _fold(acc, pv, alpha, p_scale, o_rows, LAZY)
    _release(k_bars, v_bars, STAGES)
    _store_tile(O, acc, l_i, V_SCALE, b, h, bh, pid_m, n_q, s_ob, s_ol, s_oh, io_layout,
                BLOCK_M, D)


@gluon.jit
def _softmax_bf16(s, m_i, l_i, q_scale, k_scale, col0, keys, p_layout: gl.constexpr,
                  s_layout: gl.constexpr, BLOCK_N: gl.constexpr, MASKED: gl.constexpr,
                  NO_EXP2: gl.constexpr = False):
    """bf16 P = exp2(s - m_new) of one key block in the P.V operand layout (for 16-bit operands
    the wgmma accumulator's registers already are the operand's), the new max, the row sums and
    the accumulator's factor: (p, m_new, l_i, alpha). attention_int8_kernels._bf16_pv_block's
    arithmetic, operation for operation. NO_EXP2 (diagnostics only): P is its exponent."""
    f = (s + MAGIC_BITS).to(gl.float32, bitcast=True)
    if MASKED:
        cols = col0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        f = gl.where(cols[None, :] < keys, f, float("-inf"))
    f_max = gl.max(f, axis=1)
    c = q_scale * k_scale
    m_block = (f_max - 12582912.0) * c
    m_new = gl.maximum(m_i, m_block)
    alpha = gl.exp2(m_i - m_new)
    x = gl.fma(f, c[:, None], ((m_block - m_new) - f_max * c)[:, None])
    if MASKED:
        x = gl.where(cols[None, :] < keys, x, float("-inf"))
    if NO_EXP2:
        p = x
    else:
        p = gl.exp2(x)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return gl.convert_layout(p.to(gl.bfloat16), p_layout, assert_trivial=True), m_new, l_i, alpha


@gluon.jit
def _loop_bf16(acc, m_i, l_i, s, acc_tok, q_op, q_scale, ks_ptr, keys, n_blocks, k_desc, v_desc,
               k_smem, v_smem, k_bars, v_bars, row0, zero_s, p_layout: gl.constexpr,
               s_layout: gl.constexpr, o_rows: gl.constexpr, STAGES: gl.constexpr,
               BLOCK_N: gl.constexpr, DIAG: gl.constexpr):
    """Every key block but the last, bf16 P.V accumulated by the wgmma itself. DIAG (bench
    only, wrong results): 1 computes no exp2, 2 issues no wgmma (P only feeds a row sum),
    3 loads no V tile past the ring's first fill, 4 neither K nor V tiles."""
    for j in range(0, n_blocks - 1):
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
        if j + STAGES - 1 < n_blocks:
            _load_v(v_desc, v_smem, v_bars, row0, 0, j + STAGES - 1, STAGES, BLOCK_N, False,
                    DIAG >= 3)
        if DIAG == 2:
            s_next = warpgroup_mma_init(zero_s)
        else:
            s_next = _issue_scores(q_op, k_smem, k_bars, j + 1, zero_s, STAGES)
        p, m_i, l_i, alpha = _softmax_bf16(s, m_i, l_i, q_scale, gl.load(ks_ptr + j),
                                           j * BLOCK_N, keys, p_layout, s_layout, BLOCK_N,
                                           False, DIAG == 1)
        acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
        slot = j % STAGES
        mbarrier.wait(v_bars.index(slot), (j // STAGES) & 1)
        if DIAG == 2:
            row = gl.convert_layout(gl.sum(p.to(gl.float32), axis=1), o_rows)
            acc_tok = warpgroup_mma_init(acc + row[:, None])
        else:
            acc_tok = warpgroup_mma(p, v_smem.index(slot), acc, is_async=True)
        s = warpgroup_mma_wait(num_outstanding=1, deps=(s_next,))
        if j + STAGES < n_blocks:
            _load_k(k_desc, k_smem, k_bars, row0, j + STAGES, STAGES, BLOCK_N, DIAG == 4)
    return acc, m_i, l_i, s, acc_tok


@gluon.jit
def _attn_kernel_bf16(Q, k_desc, v_desc, K_SCALE, O, n_q, keys, padded, heads, factor,
                      s_qb, s_ql, s_qh, s_ob, s_ol, s_oh,
                      STAGES: gl.constexpr, BLOCK_M: gl.constexpr, num_warps: gl.constexpr,
                      DIAG: gl.constexpr = 0):
    """bf16 P.V: INT8 Q.K^T as in _attn_kernel, P and V (quantize_kv's padded bf16 copy) in
    bf16 on the tensor cores, accumulated in fp32 by the wgmma itself (no per-block int32 result
    to fold: 64 registers and ~3 instructions per output element and block fewer).
    Per block: wait P.V[j-1]; issue S[j+1]; softmax of S[j] (the tensor cores run S[j+1]);
    acc *= alpha; issue P.V[j] on acc; wait S[j+1] (P.V[j] keeps running)."""
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    D: gl.constexpr = k_desc.block_type.shape[1]
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N, 32)
    o_layout: gl.constexpr = _mma_layout(num_warps, D, 16)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    io_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
    b, h, bh, pid_m, q_op, q_scale, row0, n_blocks, ks_ptr = _program(
        Q, K_SCALE, n_q, keys, padded, heads, factor, s_qb, s_ql, s_qh, s_layout, io_layout,
        BLOCK_M, BLOCK_N, D)
    k_smem, v_smem, k_bars, v_bars = _ring(k_desc, v_desc, row0, 0, n_blocks, STAGES, BLOCK_N,
                                           False)

    zero_s = gl.zeros([BLOCK_M, BLOCK_N], gl.int32, layout=s_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, layout=s_rows)
    l_i = gl.zeros([BLOCK_M], gl.float32, layout=s_rows)
    acc = gl.zeros([BLOCK_M, D], gl.float32, layout=o_layout)

    s = _issue_scores(q_op, k_smem, k_bars, 0, zero_s, STAGES)
    s = warpgroup_mma_wait(num_outstanding=0, deps=(s,))
    # a product of zero P in flight before the loop, so every pass starts alike (see _attn_kernel)
    mbarrier.wait(v_bars.index(0), 0)
    acc_tok = warpgroup_mma(gl.zeros([BLOCK_M, BLOCK_N], gl.bfloat16, layout=p_layout),
                            v_smem.index(0), acc, is_async=True)
    acc, m_i, l_i, s, acc_tok = _loop_bf16(acc, m_i, l_i, s, acc_tok, q_op, q_scale, ks_ptr,
                                           keys, n_blocks, k_desc, v_desc, k_smem, v_smem,
                                           k_bars, v_bars, row0, zero_s, p_layout, s_layout,
                                           o_rows, STAGES, BLOCK_N, DIAG)

    last = n_blocks - 1
    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc_tok,))
    p, m_i, l_i, alpha = _softmax_bf16(s, m_i, l_i, q_scale, gl.load(ks_ptr + last),
                                       last * BLOCK_N, keys, p_layout, s_layout, BLOCK_N, True)
    acc = acc * gl.convert_layout(alpha, o_rows)[:, None]
    mbarrier.wait(v_bars.index(last % STAGES), (last // STAGES) & 1)
    acc = warpgroup_mma(p, v_smem.index(last % STAGES), acc)
    _release(k_bars, v_bars, STAGES)
    _store_tile(O, acc, l_i, K_SCALE, b, h, bh, pid_m, n_q, s_ob, s_ol, s_oh, io_layout,
                BLOCK_M, D, False)


def _layouts(block_n: int, head_dim: int):
    """The shared-memory layouts of the K tile [block_n, D] and the V^T tile [D, block_n]."""
    return (gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl.int8),
            gl.NVMMASharedLayout.get_default_for([head_dim, block_n], gl.int8))


def attention(q, k_int, k_scale, v_t, v_scale, out, keys: int, factor: float, *, block_m: int,
              block_n: int, num_warps: int, num_stages: int, lazy: bool = False,
              pv: str = "int8", diag: int = 0, **_unused):
    """The Gluon kernel of `pv` on quantize_kv(..., gluon=True)'s output (INT8 K [B*H, padded,
    D]; INT8 V^T [B*H, D, padded] or bf16 V [B*H, padded, D]); returns the launched kernel.
    `diag` (bf16, bench/attention.py --diagnose only): _loop_bf16's DIAG 1-4, wrong outputs."""
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    bh, padded, d = k_int.shape
    k_layout, v_layout = _layouts(block_n, d)
    k_desc = TensorDescriptor(k_int, [bh * padded, d], [d, 1], [block_n, d], k_layout)
    b, n_q, h, _ = q.shape
    grid = (triton.cdiv(n_q, block_m), b * h)
    if pv == "bf16":
        v_desc = TensorDescriptor(v_t, [bh * padded, d], [d, 1], [block_n, d],
                                  _bf16_layout(block_n, d))
        return _attn_kernel_bf16[grid](q, k_desc, v_desc, k_scale, out, n_q, keys, padded, h,
                                       factor, q.stride(0), q.stride(1), q.stride(2),
                                       out.stride(0), out.stride(1), out.stride(2),
                                       STAGES=num_stages, BLOCK_M=block_m, DIAG=int(diag),
                                       num_warps=num_warps)
    v_desc = TensorDescriptor(v_t, [bh * d, padded], [padded, 1], [d, block_n], v_layout)
    return _attn_kernel[grid](q, k_desc, v_desc, k_scale, v_scale, out, n_q, keys, padded, h,
                              factor, q.stride(0), q.stride(1), q.stride(2),
                              out.stride(0), out.stride(1), out.stride(2),
                              STAGES=num_stages, BLOCK_M=block_m, LAZY=bool(lazy),
                              num_warps=num_warps)


def _bf16_layout(block_n: int, head_dim: int):
    return gl.NVMMASharedLayout.get_default_for([block_n, head_dim], gl.bfloat16)


def aot_compile(capability: int, config: dict, head_dim: int = 128, dtype: str = "bf16"):
    """The kernel for sm_`capability` without a GPU (front end, passes, ptxas)."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    bn = config["block_n"]
    k_layout, v_layout = _layouts(bn, head_dim)
    bf16 = config.get("pv", "int8") == "bf16"
    fn = _attn_kernel_bf16 if bf16 else _attn_kernel
    sig = {"Q": f"*{dtype}", "k_desc": f"tensordesc<i8[{bn}, {head_dim}],{k_layout!r}>"}
    if bf16:
        sig["v_desc"] = f"tensordesc<bf16[{bn}, {head_dim}],{_bf16_layout(bn, head_dim)!r}>"
        sig.update({"K_SCALE": "*fp32", "O": f"*{dtype}"})
    else:
        sig["v_desc"] = f"tensordesc<i8[{head_dim}, {bn}],{v_layout!r}>"
        sig.update({"K_SCALE": "*fp32", "V_SCALE": "*fp32", "O": f"*{dtype}"})
    sig.update({name: "i32" for name in ("n_q", "keys", "padded", "heads")}, factor="fp32")
    sig.update({f"s_{t}{s}": "i32" for t in "qo" for s in "blh"})
    consts = {"STAGES": config["num_stages"], "BLOCK_M": config["block_m"],
              "num_warps": config["num_warps"]}
    if not bf16:
        consts["LAZY"] = bool(config.get("lazy", False))
    else:
        consts["DIAG"] = 0
    sig.update({name: "constexpr" for name in consts})
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items()
             if t.startswith("*")}
    src = GluonASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": config["num_warps"]})
