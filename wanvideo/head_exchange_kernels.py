"""Triton kernel of head_exchange (the entry point, which says what the layouts are). This module
imports triton at the top, so only head_exchange._kernel() imports it, the first time it is
needed. No `from __future__ import annotations`: Triton 3.0's interpreter recognizes a constexpr
parameter only by a real tl.constexpr annotation."""
import triton
import triton.language as tl


@triton.jit
def _copy_chunk(t_ptr, e_ptr, t_off, e_off, CHUNK: tl.constexpr, TO_EXCHANGE: tl.constexpr,
                BLOCK: tl.constexpr):
    for off in range(0, CHUNK, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        m = cols < CHUNK
        if TO_EXCHANGE:
            tl.store(e_ptr + e_off + cols, tl.load(t_ptr + t_off + cols, mask=m), mask=m)
        else:
            tl.store(t_ptr + t_off + cols, tl.load(e_ptr + e_off + cols, mask=m), mask=m)


@triton.jit
def exchange(t0, t1, t2, e_ptr, own_ptr, ME, ROWS, ROW_STRIDE, WORLD, PIECES, SLOTS, SLOT0,
             CHUNK: tl.constexpr, NT: tl.constexpr, TO_EXCHANGE: tl.constexpr,
             BLOCK: tl.constexpr):
    """One program: token row r, head group c = j * PIECES + p, each of the NT (1-3) tensors,
    tensor i in slot SLOT0 + i of SLOTS (layout [pieces, slots, world, rows, CHUNK]). CHUNK
    (hp * D elements) is a compile-time constant: a model has one or two. Rank ME's slots go to
    own_ptr (same layout as e_ptr) instead of e_ptr; ME = -1: every slot in e_ptr."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1)
    j = c // PIECES
    p = c - j * PIECES
    t_off = r * ROW_STRIDE + c.to(tl.int64) * CHUNK
    plane = ROWS.to(tl.int64) * CHUNK
    e_off = ((p * SLOTS + SLOT0) * WORLD + j).to(tl.int64) * plane + r * CHUNK
    dst = e_ptr
    if j == ME:
        dst = own_ptr
    _copy_chunk(t0, dst, t_off, e_off, CHUNK, TO_EXCHANGE, BLOCK)
    if NT > 1:
        _copy_chunk(t1, dst, t_off, e_off + WORLD * plane, CHUNK, TO_EXCHANGE, BLOCK)
    if NT > 2:
        _copy_chunk(t2, dst, t_off, e_off + 2 * WORLD * plane, CHUNK, TO_EXCHANGE, BLOCK)
