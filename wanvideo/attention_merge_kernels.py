"""Triton kernel of attention.merge_partial (the entry point). This module imports triton at the
top, so only attention._merge_kernel() imports it, the first time it is needed. No `from
__future__ import annotations`: Triton 3.0's interpreter recognizes a constexpr parameter only by
a real tl.constexpr annotation."""
import triton
import triton.language as tl


@triton.jit
def merge(a_ptr, b_ptr, la_ptr, lb_ptr, out_ptr, lo_ptr, L, H,
          s_ab, s_al, s_ah, s_bb, s_bl, s_bh, s_lab, s_lah, s_lal, s_lbb, s_lbh, s_lbl,
          D: tl.constexpr, BLOCK_H: tl.constexpr):
    """One program: token l of batch b, every head; fp32 weights and sums, one rounding."""
    row = tl.program_id(0)
    b = row // L
    l = row - b * L
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, D)
    hm = h < H
    la = tl.load(la_ptr + b * s_lab + h * s_lah + l * s_lal, mask=hm, other=0.0)
    lb = tl.load(lb_ptr + b * s_lbb + h * s_lbh + l * s_lbl, mask=hm, other=0.0)
    m = tl.maximum(la, lb)
    ea = tl.exp(la - m)
    eb = tl.exp(lb - m)
    total = ea + eb
    mask = hm[:, None]
    a = tl.load(a_ptr + b.to(tl.int64) * s_ab + l.to(tl.int64) * s_al + h[:, None] * s_ah
                + d[None, :], mask=mask, other=0.0).to(tl.float32)
    bb = tl.load(b_ptr + b.to(tl.int64) * s_bb + l.to(tl.int64) * s_bl + h[:, None] * s_bh
                 + d[None, :], mask=mask, other=0.0).to(tl.float32)
    out = (a * (ea / total)[:, None] + bb * (eb / total)[:, None])
    tl.store(out_ptr + row.to(tl.int64) * H * D + h[:, None] * D + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lo_ptr + (b * H + h).to(tl.int64) * L + l, m + tl.log(total), mask=hm)
