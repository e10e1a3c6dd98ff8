"""The consumer loop of the CUDA attention kernel with INT8 P.V (attention_int8_cuda_source
builds it in with `pv_int8=True`): the numerics of attention_8bit.kernel_reference(pv="int8").

Per 128-key block and row: P = round(127 * exp2(s - m_block)) against the block's own maximum,
exact in int8; V^T is INT8 per channel in quantize_kv's Gluon key order (key 16g + 8i + 2t + e
of a block at column 16g + 4t + 2i + e), which makes the score accumulator's registers, packed
byte by byte in register order, the INT8 A operand of the P.V wgmma; the int32 P.V tile is
folded into the fp32 accumulator with the block's weight exp2(m_block - m_running), and the row
sum takes the same integers. The int32 tile starts from the bits of 1.5 * 2^23, so it reads as
a float without a conversion. Half the tensor-core time of bf16 P.V, one fold (2 operations per
output element) per block more on the CUDA cores.
"""
from __future__ import annotations

CONSUME_INT8 = r"""
template <bool MASKED>
__device__ __forceinline__ void softmax_int8(
    int* s, float& m0, float& m1, float& l0, float& l1, float& al0, float& al1,
    float& ps0, float& ps1, float c0, float c1, int col0, int tq, int keys) {
  // s: the block's scores (preset accumulator: float bits) in; the bits of
  // fma(exp2(score - block max), 127, 1.5 * 2^23) out, whose low byte is P in int8
  float mx0, mx1;
  block_max<MASKED>(s, true, col0, tq, keys, mx0, mx1);
  const float mb0 = raise_max(mx0, c0, m0, al0, NEG_INF);
  const float mb1 = raise_max(mx1, c1, m1, al1, NEG_INF);
  ps0 = ex2(mb0 - m0);   // the block's weight against the running maximum
  ps1 = ex2(mb1 - m1);
  const float off0 = -(mx0 * c0), off1 = -(mx1 * c1);
  u32 sum0 = 0, sum1 = 0;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    bool row1 = (i & 2) != 0;
    float x = fmaf(__int_as_float(s[i]), row1 ? c1 : c0, row1 ? off1 : off0);
    if (MASKED && col0 + 8 * (i >> 2) + 2 * tq + (i & 1) >= keys) x = NEG_INF;
    u32 bits = (u32)__float_as_int(fmaf(DIAG == 2 ? x : ex2(x), 127.f, MAGIC));
    s[i] = (int)bits;
    if (row1) sum1 += bits; else sum0 += bits;
  }
  // 32 values per row, each 1.5 * 2^23's bits + P (wrapping u32 arithmetic: exact)
  sum0 -= 32u * (u32)MAGIC_BITS;
  sum1 -= 32u * (u32)MAGIC_BITS;
  l0 = l0 * al0 + ps0 * (float)(int)sum0;
  l1 = l1 * al1 + ps1 * (float)(int)sum1;
}

__device__ __forceinline__ u32 bytes4(int a, int b, int c, int d) {
  return __byte_perm(__byte_perm((u32)a, (u32)b, 0x0040), __byte_perm((u32)c, (u32)d, 0x0040),
                     0x5410);
}

__device__ __forceinline__ void pack_p8(const int* s, u32* pa) {
  // k-step kk (32 keys, accumulator chunks 4kk..4kk+3): rows g / g+8, operand columns
  // 4t..4t+3 then 16+4t..16+4t+3, i.e. accumulator elements in register order
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int* e = s + 16 * kk;
    pa[4 * kk] = bytes4(e[0], e[1], e[4], e[5]);
    pa[4 * kk + 1] = bytes4(e[2], e[3], e[6], e[7]);
    pa[4 * kk + 2] = bytes4(e[8], e[9], e[12], e[13]);
    pa[4 * kk + 3] = bytes4(e[10], e[11], e[14], e[15]);
  }
}

__device__ __forceinline__ void issue_pv8(int* pv, const u32* pa, u32 vt) {
#pragma unroll
  for (int i = 0; i < 64; ++i) pv[i] = MAGIC_BITS;
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_s8_rs(pv, pa + 4 * kk, desc_sw128(vt) + 2 * kk, 1);
  wg_commit();
}

__device__ __forceinline__ void fold(float* acc, const int* pv, float a0, float a1, float p0,
                                     float p1) {
  // acc = acc * alpha + (exact int32 P.V) * block weight; alpha is exactly 1 for rows whose
  // maximum the block did not raise, and a warp of such rows skips the multiplication
  const bool keep = __all_sync(0xffffffff, a0 == 1.f && a1 == 1.f);
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    const bool row1 = (i & 2) != 0;
    const float a = keep ? acc[i] : acc[i] * (row1 ? a1 : a0);
    acc[i] = fmaf(__int_as_float(pv[i]) - MAGIC, row1 ? p1 : p0, a);
  }
}

__device__ __forceinline__ void consume(
    u32 k_ring, u32 v_ring, u32 full_k, u32 empty_k, u32 full_v, u32 empty_v, u32 q_tile,
    float qs0, float qs1, float bound0, float bound1, const float* ks_ptr, const float* vs_ptr,
    int n_blocks, int keys, int wg, int warp, int g, int tq, int row0, int n_q, u16* o_base,
    long long s_ol) {
  // (the bounds are the bf16 loop's: not used here)
  const u64 dq = desc_sw128(q_tile);
  // FA3's order as in the bf16 loop: Q.K^T[j] and P.V[j-1] in flight, softmax j under P.V[j-1],
  // then P.V[j-1] folded with block j-1's weights
  const u32 my_turn = 2 + wg, their_turn = 5 - wg;
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.f;
  int s[64], pv[64];
  u32 pa[16];
  float al0, al1, ps0, ps1;
  first_scores(s, true, dq, nullptr, k_ring, full_k, empty_k);
  if (n_blocks == 1)
    softmax_int8<true>(s, m0, m1, l0, l1, al0, al1, ps0, ps1, qs0 * ks_ptr[0], qs1 * ks_ptr[0], 0, tq, keys);
  else
    softmax_int8<false>(s, m0, m1, l0, l1, al0, al1, ps0, ps1, qs0 * ks_ptr[0], qs1 * ks_ptr[0], 0, tq, keys);
  pack_p8(s, pa);
  if (PINGPONG && wg == 2 && n_blocks > 1) named_arrive(3, 256);
  for (int j = 1; j < n_blocks; ++j) {
    const int st = j % STAGES, pst = (j - 1) % STAGES;
    const float ks = ks_ptr[j];
    preload_scores(s, k_ring + MAGIC_OFF);
    mbar_wait(full_k + 8 * st, (u32)(j / STAGES) & 1);
    if (PINGPONG) named_sync(my_turn, 256);
    issue_scores(s, dq, desc_sw128(k_ring + st * K_BYTES), true);
    mbar_wait(full_v + 8 * pst, (u32)((j - 1) / STAGES) & 1);
    issue_pv8(pv, pa, v_ring + pst * V_SLOT);
    if (PINGPONG && !(wg == 2 && j == n_blocks - 1)) named_arrive(their_turn, 256);
    if (!PV8_OVERLAP) {  // both products waited for, P.V[j-1] folded, then softmax j
      wg_wait0();
#pragma unroll
      for (int i = 0; i < 64; ++i) { fence_r(s[i]); fence_r(pv[i]); }
#pragma unroll
      for (int i = 0; i < 16; ++i) fence_u(pa[i]);
      mbar_arrive(empty_k + 8 * st);
      mbar_arrive(empty_v + 8 * pst);
      fold(acc, pv, al0, al1, ps0, ps1);
      if (j == n_blocks - 1)
        softmax_int8<true>(s, m0, m1, l0, l1, al0, al1, ps0, ps1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq, keys);
      else
        softmax_int8<false>(s, m0, m1, l0, l1, al0, al1, ps0, ps1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq, keys);
      pack_p8(s, pa);
      continue;
    }
    wg_wait1();
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_r(s[i]);
    mbar_arrive(empty_k + 8 * st);
    const float pal0 = al0, pal1 = al1, pps0 = ps0, pps1 = ps1;
    if (j == n_blocks - 1)
      softmax_int8<true>(s, m0, m1, l0, l1, al0, al1, ps0, ps1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq, keys);
    else
      softmax_int8<false>(s, m0, m1, l0, l1, al0, al1, ps0, ps1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq, keys);
    wg_wait0();
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_r(pv[i]);
#pragma unroll
    for (int i = 0; i < 16; ++i) fence_u(pa[i]);
    mbar_arrive(empty_v + 8 * pst);
    fold(acc, pv, pal0, pal1, pps0, pps1);
    pack_p8(s, pa);
  }
  {
    const int last = n_blocks - 1, st = last % STAGES;
    mbar_wait(full_v + 8 * st, (u32)(last / STAGES) & 1);
    issue_pv8(pv, pa, v_ring + st * V_SLOT);
    wg_wait0();
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_r(pv[i]);
#pragma unroll
    for (int i = 0; i < 16; ++i) fence_u(pa[i]);
    mbar_arrive(empty_v + 8 * st);
    fold(acc, pv, al0, al1, ps0, ps1);
  }
  quad_sum(l0);
  quad_sum(l1);
  store_tile<true>(acc, l0, l1, vs_ptr, row0, n_q, o_base, s_ol, tq);
}
"""
