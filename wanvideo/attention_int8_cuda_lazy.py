"""Two parts of the CUDA attention kernel's bf16 loop (attention_int8_cuda_source), on by default:
the query operand in registers (`q_regs`) and the softmax that does not wait for a block's
maximum (`lazy_max`, blocks after the first). The static maximum (attention_int8_cuda_static)
needs no test at all; the lazy loop runs where its bound is too loose.

Query operand: each thread loads its INT8 A fragments of Q once (16 registers); every Q.K^T
wgmma then reads only K from shared memory (the tiles' bandwidth is shared with the P.V
operand and the TMA writes).

Lazy maximum: in the max-first softmax a warp's 64 comparisons (two cycles each on the ALU
pipe) and the shuffles that combine a row's four threads sit between the scores and the first
exp2, where the other warpgroup's products have to cover them. Here the running value m is a
row's maximum plus LAZY_SLACK (raise_max's headroom), P = exp2(score - m) is computed straight
away, and the only test is whether every P stayed <= 1: the sign bits of all 64 exponents,
ANDed bitwise (a third of the comparisons' ALU instructions, no shuffles). P is then exactly
what the max-first order gives, times 2^-k for a k in [0, LAZY_SLACK] that the row sums (P.V's
ones columns) divide out again; fp32 and bf16 keep their relative precision there.
When a block raised some P above 1 the warp finds its rows' largest P, moves m to it plus the
headroom and rescales P (the accumulator gets the same factor, as in the max-first order).
Where exp2 may have overflowed, the warp recomputes its 16 x 128 scores with warp-level
mma.sync from the Q and K tiles still in shared memory (the same integers as the wgmma) and
runs the max-first softmax on them; the K slot is therefore released after the softmax.
"""
from __future__ import annotations

LAZY = r"""
__device__ __forceinline__ u32 lds32(u32 addr) {
  u32 v; asm volatile("ld.shared.b32 %0, [%1];" : "=r"(v) : "r"(addr)); return v;
}
__device__ __forceinline__ void mma_s8(int* d, const u32* a, u32 b0, u32 b1) {
  asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
               "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
               : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Both tiles have 128-byte rows whose 16-byte chunk c sits at c ^ (row % 8); row % 8 is g for
// the warp's query rows (16 warp + g, + 8) and for the keys it multiplies (8 j + g). A thread's
// INT8 A fragment of 32 channels kk: rows g and g + 8, bytes 4 tq.. of chunks 2 kk, 2 kk + 1.
__device__ __forceinline__ void load_q_step(u32* a, u32 q_tile, int warp, int g, int tq,
                                            int kk) {
  const u32 q0 = q_tile + (warp * 16 + g) * 128 + 4 * tq, q1 = q0 + 8 * 128;
  const u32 lo = (u32)(((2 * kk) ^ g) << 4), hi = (u32)(((2 * kk + 1) ^ g) << 4);
  a[0] = lds32(q0 + lo);
  a[1] = lds32(q1 + lo);
  a[2] = lds32(q0 + hi);
  a[3] = lds32(q1 + hi);
}

__device__ __forceinline__ void load_q_fragments(u32* qa, u32 q_tile, int warp, int g, int tq) {
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) load_q_step(qa + 4 * kk, q_tile, warp, g, tq, kk);
}

__device__ __forceinline__ void rescue_scores(int* s, u32 q_tile, u32 k_tile, int warp, int g,
                                              int tq) {
  // this warp's rows of the block's scores again, onto preload_scores' start value
  const u32 k0 = k_tile + g * 128 + 4 * tq;
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = MAGIC_BITS;
#pragma unroll 1
  for (int kk = 0; kk < 4; ++kk) {   // 32 of the 128 channels per step: 4 A registers live
    u32 a[4];
    load_q_step(a, q_tile, warp, g, tq, kk);
    const u32 lo = (u32)(((2 * kk) ^ g) << 4), hi = (u32)(((2 * kk + 1) ^ g) << 4);
#pragma unroll
    for (int j = 0; j < 16; ++j)
      mma_s8(s + 4 * j, a, lds32(k0 + j * 1024 + lo), lds32(k0 + j * 1024 + hi));
  }
}

template <bool MASKED>
__device__ __forceinline__ void softmax_lazy(
    int* s, float& m0, float& m1, float& l0, float& l1, float& al0, float& al1, float c0,
    float c1, int col0, int tq, int keys, u32 q_tile, u32 k_tile, int warp, int g) {
  // s: the block's scores (preset accumulator) in, fp32 P out; m: the running values (finite:
  // block 0 went through softmax_block); al: the accumulator's factors (1 unless m moved);
  // l: the row sums unless ROWSUM_MMA
  const float off0 = -fmaf(MAGIC, c0, m0), off1 = -fmaf(MAGIC, c1, m1);
  u32 neg[4] = {~0u, ~0u, ~0u, ~0u};
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const bool row1 = (i & 2) != 0;
    float x = fmaf(__int_as_float(s[i]), row1 ? c1 : c0, row1 ? off1 : off0);
    if (MASKED && col0 + 8 * (i >> 2) + 2 * tq + (i & 1) >= keys) x = NEG_INF;
    neg[i & 3] &= __float_as_uint(x);
    const float p = DIAG == 2 ? x : ex2(x);
    s[i] = __float_as_int(p);
    if (!ROWSUM_MMA) {
      if (row1) sum1 += p; else sum0 += p;
    }
  }
  al0 = 1.f;
  al1 = 1.f;
  if (DIAG >= 3 || __all_sync(0xffffffff, (int)(neg[0] & neg[1] & neg[2] & neg[3]) < 0)) {
    l0 += sum0;
    l1 += sum1;
    return;
  }
  float pm0 = 0.f, pm1 = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    if (i & 2) pm1 = fmaxf(pm1, __int_as_float(s[i]));
    else pm0 = fmaxf(pm0, __int_as_float(s[i]));
  }
  pm0 = fmaxf(pm0, __shfl_xor_sync(0xffffffff, pm0, 1));
  pm1 = fmaxf(pm1, __shfl_xor_sync(0xffffffff, pm1, 1));
  pm0 = fmaxf(pm0, __shfl_xor_sync(0xffffffff, pm0, 2));
  pm1 = fmaxf(pm1, __shfl_xor_sync(0xffffffff, pm1, 2));
  if (__any_sync(0xffffffff, !(pm0 <= 1e30f && pm1 <= 1e30f))) {   // exp2 may have overflowed
    rescue_scores(s, q_tile, k_tile, warp, g, tq);
    softmax_block<MASKED>(s, m0, m1, l0, l1, al0, al1, c0, c1, col0, tq, keys);
    return;
  }
  const float sh0 = pm0 > 1.f ? __log2f(pm0) + LAZY_SLACK : 0.f;
  const float sh1 = pm1 > 1.f ? __log2f(pm1) + LAZY_SLACK : 0.f;
  al0 = ex2(-sh0);
  al1 = ex2(-sh1);
  m0 += sh0;
  m1 += sh1;
  l0 = (l0 + sum0) * al0;
  l1 = (l1 + sum1) * al1;
#pragma unroll
  for (int i = 0; i < 64; ++i)
    s[i] = __float_as_int(__int_as_float(s[i]) * ((i & 2) ? al1 : al0));
}
"""
