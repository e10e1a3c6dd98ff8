"""The bf16 P.V consumer loop of the CUDA attention kernel (attention_int8_cuda_source), the
default: block 0 max-first, then the key blocks in FlashAttention-3's order, in one of two loops
chosen per warpgroup after block 0, the static maximum's (attention_int8_cuda_static: no
per-block test) or the lazy maximum's (attention_int8_cuda_lazy), and the output tile.
"""
from __future__ import annotations

CONSUME_BF16 = r"""
template <bool FIXED>
__device__ __forceinline__ void consume_blocks(
    u32 k_ring, u32 v_ring, u32 full_k, u32 empty_k, u32 full_v, u32 empty_v, u32 q_tile,
    u64 dq, const u32* qa, float qs0, float qs1, const float* ks_ptr, int n_blocks, int keys,
    int wg, int warp, int g, int tq, int* s, u32* pa, float* acc, float& m0, float& m1,
    float& l0, float& l1, float& al0, float& al1) {
  // key blocks 1.. in FA3's order: Q.K^T[j] and P.V[j-1] in flight together, the softmax of
  // block j under P.V[j-1]; with PINGPONG the two warpgroups also take turns issuing their
  // products (named barriers 3 and 4), so one's softmax runs while the other's products run.
  // FIXED: m stays as block 0 set it (attention_int8_cuda_static): no rescale, no test.
  const u32 my_turn = 2 + wg, their_turn = 5 - wg;
  for (int j = 1; j < n_blocks; ++j) {
    const int st = j % STAGES, pst = (j - 1) % STAGES;
    const float ks = ks_ptr[j];
    if (PRELOAD && DIAG != 3) preload_scores(s, k_ring + MAGIC_OFF);
    mbar_wait(full_k + 8 * st, (u32)(j / STAGES) & 1);
    if (PINGPONG) named_sync(my_turn, 256);
#if Q_REGS
    issue_scores_rs(s, qa, desc_sw128(k_ring + st * K_BYTES));
#else
    issue_scores(s, dq, desc_sw128(k_ring + st * K_BYTES), PRELOAD);
#endif
    if (!FIXED) scale_rows(acc, al0, al1);
    mbar_wait(full_v + 8 * pst, (u32)((j - 1) / STAGES) & 1);
    issue_pv(acc, pa, v_ring + pst * V_SLOT);
    if (PINGPONG && !(wg == 2 && j == n_blocks - 1)) named_arrive(their_turn, 256);
    wg_wait1();
#pragma unroll
    for (int i = 0; i < 64; ++i) fence_r(s[i]);
    if (FIXED) {
      release(empty_k + 8 * st);
      if (j == n_blocks - 1)
        softmax_static<true>(s, m0, m1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq, keys);
      else
        softmax_static<false>(s, m0, m1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq, keys);
    } else {
#if LAZY_MAX   // the K tile stays until softmax_lazy knows it needs no rescue
      const u32 k_tile = k_ring + st * K_BYTES;
      if (j == n_blocks - 1)
        softmax_lazy<true>(s, m0, m1, l0, l1, al0, al1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq,
                           keys, q_tile, k_tile, warp, g);
      else
        softmax_lazy<false>(s, m0, m1, l0, l1, al0, al1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq,
                            keys, q_tile, k_tile, warp, g);
      release(empty_k + 8 * st);
#else
      release(empty_k + 8 * st);
      if (j == n_blocks - 1)
        softmax_block<true>(s, m0, m1, l0, l1, al0, al1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq,
                            keys);
      else
        softmax_block<false>(s, m0, m1, l0, l1, al0, al1, qs0 * ks, qs1 * ks, j * BLOCK_N, tq,
                             keys);
#endif
    }
    wg_wait0();
#pragma unroll
    for (int i = 0; i < NACC; ++i) fence_f(acc[i]);
#pragma unroll
    for (int i = 0; i < 32; ++i) fence_u(pa[i]);
    release(empty_v + 8 * pst);
    pack_p(s, pa);
  }
}

__device__ __forceinline__ void consume(
    u32 k_ring, u32 v_ring, u32 full_k, u32 empty_k, u32 full_v, u32 empty_v, u32 q_tile,
    float qs0, float qs1, float bound0, float bound1, const float* ks_ptr, const float* vs_ptr,
    int n_blocks, int keys, int wg, int warp, int g, int tq, int row0, int n_q, u16* o_base,
    long long s_ol) {
  // bound: no score of the row exceeds it in the log2 domain (STATIC_MAX)
  const u64 dq = desc_sw128(q_tile);
  u32 qa[Q_REGS ? 16 : 1];
  if (Q_REGS) load_q_fragments(qa, q_tile, warp, g, tq);
  float m0 = NEG_INF, m1 = NEG_INF, l0 = 0.f, l1 = 0.f;
  float acc[NACC];
#pragma unroll
  for (int i = 0; i < NACC; ++i) acc[i] = 0.f;
  int s[64];
  u32 pa[32];
  float al0, al1, mx0, mx1, floor0 = NEG_INF, floor1 = NEG_INF;
  const float c0 = qs0 * ks_ptr[0], c1 = qs1 * ks_ptr[0];
  first_scores(s, PRELOAD, dq, qa, k_ring, full_k, empty_k);
  if (n_blocks == 1) block_max<true>(s, PRELOAD, 0, tq, keys, mx0, mx1);
  else block_max<false>(s, PRELOAD, 0, tq, keys, mx0, mx1);
  bool fixed = false;
#if STATIC_MAX
  // the warp vote tells ptxas that `fixed` is the same on every lane: the loops then keep
  // their counters and wgmma descriptors in uniform registers (under a branch on a per-thread
  // value they did not, and the static loop ran ~10% slower)
  const bool fits = bound0 - (mx0 - MAGIC) * c0 <= STATIC_WINDOW &&
                    bound1 - (mx1 - MAGIC) * c1 <= STATIC_WINDOW;
  fixed = DIAG == 5 || __all_sync(0xffffffff, wg_all(wg, fits));
  if (fixed) {
    floor0 = bound0 - STATIC_CAP;
    floor1 = bound1 - STATIC_CAP;
  }
#endif
  if (n_blocks == 1)
    softmax_after_max<true>(s, mx0, mx1, m0, m1, l0, l1, al0, al1, c0, c1, 0, tq, keys, floor0,
                            floor1);
  else
    softmax_after_max<false>(s, mx0, mx1, m0, m1, l0, l1, al0, al1, c0, c1, 0, tq, keys, floor0,
                             floor1);
  pack_p(s, pa);
  if (PINGPONG && wg == 2 && n_blocks > 1) named_arrive(3, 256);
  if (fixed)
    consume_blocks<true>(k_ring, v_ring, full_k, empty_k, full_v, empty_v, q_tile, dq, qa, qs0,
                         qs1, ks_ptr, n_blocks, keys, wg, warp, g, tq, s, pa, acc, m0, m1, l0,
                         l1, al0, al1);
  else
    consume_blocks<false>(k_ring, v_ring, full_k, empty_k, full_v, empty_v, q_tile, dq, qa, qs0,
                          qs1, ks_ptr, n_blocks, keys, wg, warp, g, tq, s, pa, acc, m0, m1, l0,
                          l1, al0, al1);
  {
    const int last = n_blocks - 1, st = last % STAGES;
    if (!fixed) scale_rows(acc, al0, al1);   // fixed: al is still block 0's 0, not a factor
    mbar_wait(full_v + 8 * st, (u32)(last / STAGES) & 1);
    issue_pv(acc, pa, v_ring + st * V_SLOT);
    wg_wait0();
#pragma unroll
    for (int i = 0; i < NACC; ++i) fence_f(acc[i]);
#pragma unroll
    for (int i = 0; i < 32; ++i) fence_u(pa[i]);
    release(empty_v + 8 * st);
  }
  if (DIAG == 6) {   // which loop ran: 1 static, 0 lazy, in every output element
#pragma unroll
    for (int i = 0; i < NACC; ++i) acc[i] = fixed ? 1.f : 0.f;
    acc[64] = acc[66] = 1.f;
  }
  if (ROWSUM_MMA) {  // every extra column holds the sum of the row's bf16 P
    l0 = acc[64];
    l1 = acc[66];
  } else {
    quad_sum(l0);
    quad_sum(l1);
  }
  store_tile<false>(acc, l0, l1, vs_ptr, row0, n_q, o_base, s_ol, tq);
}
"""
