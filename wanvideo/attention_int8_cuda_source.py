"""CUDA C++ source of the Hopper 8-bit attention kernel with two consumer warpgroups (FA3's
shape), compiled at run time by NVRTC (wanvideo/cuda_runtime.py); no include files, raw PTX for
wgmma, TMA and mbarriers.

Why CUDA: the Gluon kernel (attention_int8_gluon) keeps one warpgroup per CTA because Triton 3.6
serializes every wgmma of a kernel with two consumer partitions (ptxas C7512,
docs/ATTENTION_8BIT.md). Here a CTA holds a producer warpgroup (one thread issues the K and V
TMA copies, registers given back by setmaxnreg) and two consumer warpgroups of 64 query rows
each, so one warpgroup's softmax runs while the other's products occupy the tensor cores.

The PTX building blocks are in attention_int8_cuda_ptx, the bf16 P.V consumer loop (default)
in attention_int8_cuda_loop, the INT8 P.V one (sweep 33, not the default) in
attention_int8_cuda_pv8, the lazy maximum and the register-held queries in
attention_int8_cuda_lazy, the static maximum in attention_int8_cuda_static. Numerics are those
of the Gluon bf16 kernel (attention_8bit.kernel_reference, pv="bf16") up to the bf16 rounding
of P at another power of two per row (lazy and static maxima):
INT8 Q per row (quantized here, written into shared memory in the wgmma layout), INT8 K per
128-key block (quantize_kv), Q.K^T exact in int32, softmax in fp32 (exp2, log2 domain), P and V
in bf16, P.V accumulated in fp32 by the wgmma. Head dim 128, 128-key blocks, bf16 in and out.

The wgmma instructions' operand lists (64 or more accumulator registers each) are generated in
Python, which is why the source is built by a function and not kept in a .cu file.
"""
from __future__ import annotations

import functools

from . import attention_int8_cuda_cluster as cluster
from . import attention_int8_cuda_ptx as ptx
from . import attention_int8_cuda_lazy as lazy
from . import attention_int8_cuda_loop as loop
from . import attention_int8_cuda_pv8 as pv8
from . import attention_int8_cuda_static as static
from . import attention_int8_cuda_vdirect as vdirect

KERNEL_NAME = "attn_int8_bf16_ws"
THREADS = 384          # producer warpgroup + two consumer warpgroups
BLOCK_M = 128          # 64 query rows per consumer warpgroup
BLOCK_N = 128
HEAD_DIM = 128


_LAYOUT = r"""
#define K_BYTES (BLOCK_N * HEAD_DIM)              // one INT8 K tile
#if PV_INT8
#define V_BYTES (BLOCK_N * HEAD_DIM)              // one INT8 V^T tile
#define V_HALF V_BYTES
#define V_SLOT V_BYTES
#define ONES_WORDS 0
#elif V_DIRECT  // attention_int8_cuda_vdirect: V itself, two boxes of 64 channels
#define V_BYTES (BLOCK_N * HEAD_DIM * 2)
#define V_BOX (V_BYTES / 2)
#define V_HALF V_BOX                              // (load_v, unused)
#define V_SLOT ((2 + ROWSUM_MMA) * V_BOX)         // ROWSUM_MMA: an atom of ones after them
#define ONES_WORDS (V_BOX / 4)                    // per slot
#else
#define V_BYTES (BLOCK_N * HEAD_DIM * 2)          // one bf16 V^T tile, two 64-key halves
// ROWSUM_MMA: each half is followed by 8 rows of ones, so P.V's extra 8 columns are the row sums
#define V_HALF (V_BYTES / 2 + ROWSUM_MMA * 1024)
#define V_SLOT (2 * V_HALF)
#define ONES_WORDS 512                            // per slot
#endif
#define NACC (64 + 4 * ROWSUM_MMA)
#define Q_OFF (STAGES * (K_BYTES + V_SLOT))
#define QS_OFF (Q_OFF + BLOCK_M * HEAD_DIM)
#define QB_OFF (QS_OFF + BLOCK_M * 4)             // |q int8 row| * qscale (static_max's bound)
#define BAR_OFF (QB_OFF + BLOCK_M * 4)
#define MAGIC_OFF (BAR_OFF + 32 * STAGES)         // 64 words of 1.5 * 2^23 (PRESET_LDS)
#define NEG_INF __int_as_float(0xff800000)
"""

_HELPERS = r"""
__device__ __forceinline__ void quantize_queries(
    const u16* __restrict__ Q, u32 q_smem, float* qscale, float* qbound, int wg, int t, int q0,
    int n_q, long long base, long long s_ql, float factor) {
  // two threads per row, 64 channels each: INT8 per row (amax / 127, half to even), stored in
  // the wgmma operand layout (128-byte rows, 16-byte chunks swizzled by row % 8); the row's
  // |int8 row| * scale into qbound (exact sum of squares)
  int row = t >> 1, half = t & 1, qr = q0 + row;
  float v[64];
  float amax = 0.f;
  if (qr < n_q) {
    const uint4* src = (const uint4*)(Q + base + (long long)qr * s_ql + half * 64);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      uint4 w = src[i];
      u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        v[8 * i + 2 * e] = bf16_to_f32(words[e] & 0xffff);
        v[8 * i + 2 * e + 1] = bf16_to_f32(words[e] >> 16);
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < 64; ++i) v[i] = 0.f;
  }
#pragma unroll
  for (int i = 0; i < 64; ++i) amax = fmaxf(amax, fabsf(v[i]));
  amax = fmaxf(amax, __shfl_xor_sync(0xffffffff, amax, 1));
  float scale = amax > 0.f ? __fdiv_rn(127.f, amax) : 0.f;
  float squares = 0.f;
#pragma unroll
  for (int c = 0; c < 4; ++c) {
    u32 w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      u32 word = 0;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float f = fmaf(v[16 * c + 4 * e + k], scale, MAGIC), n = f - MAGIC;
        squares = fmaf(n, n, squares);
        word |= ((u32)__float_as_int(f) & 0xff) << (8 * k);
      }
      w[e] = word;
    }
    u32 chunk = (u32)(half * 4 + c) ^ (u32)(row & 7);
    u32 dst = q_smem + row * 128 + chunk * 16;
    asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};"
                 :: "r"(dst), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3]) : "memory");
  }
  squares += __shfl_xor_sync(0xffffffff, squares, 1);
  if (half == 0) {
    qscale[row] = amax * factor;
    qbound[row] = sqrtf(squares) * (amax * factor);
  }
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  named_sync(wg, 128);
}

__device__ __forceinline__ void quad_sum(float& x) {  // over the 4 threads sharing a row
  x += __shfl_xor_sync(0xffffffff, x, 1);
  x += __shfl_xor_sync(0xffffffff, x, 2);
}

template <bool V_SCALED>
__device__ __forceinline__ void store_tile(const float* acc, float l0, float l1, const float* vs,
                                           int row0, int n_q, u16* o_base, long long s_ol,
                                           int tq) {
  // acc / l (times V's channel scales), bf16 pairs; rows past n_q are not written
  const int row1 = row0 + 8;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    int col = 8 * i + 2 * tq;
    float v0 = V_SCALED ? vs[col] : 1.f, v1 = V_SCALED ? vs[col + 1] : 1.f;
    if (row0 < n_q)
      *(u32*)(o_base + (long long)row0 * s_ol + col) =
          pack_bf16(acc[4 * i] / l0 * v0, acc[4 * i + 1] / l0 * v1);
    if (row1 < n_q)
      *(u32*)(o_base + (long long)row1 * s_ol + col) =
          pack_bf16(acc[4 * i + 2] / l1 * v0, acc[4 * i + 3] / l1 * v1);
  }
}

template <bool MASKED>
__device__ __forceinline__ void block_max(int* s, bool preset, int col0, int tq, int keys,
                                          float& mx0, float& mx1) {
  // s: the block's exact int32 scores in (`preset`: already 1.5 * 2^23's bits + score), the
  // float 1.5 * 2^23 + score out (as bits; -inf past `keys` with MASKED); the two rows' maxima
  mx0 = NEG_INF;
  mx1 = NEG_INF;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    float f = __int_as_float(preset ? s[i] : s[i] + MAGIC_BITS);
    if (MASKED && col0 + 8 * (i >> 2) + 2 * tq + (i & 1) >= keys) f = NEG_INF;
    s[i] = __float_as_int(f);
    if (i & 2) mx1 = fmaxf(mx1, f); else mx0 = fmaxf(mx0, f);
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffff, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffff, mx1, 2));
}

__device__ __forceinline__ float raise_max(float mx, float c, float& m, float& al,
                                           float floor) {
  // a row's block maximum (1.5 * 2^23 + max score) in the log2 domain, returned; the running
  // value m raised to it (plus HEADROOM with the lazy maximum: attention_int8_cuda_lazy) and
  // to `floor`, and al = exp2(old m - new m), the accumulator's factor
  const float mb = (mx - MAGIC) * c;
  const float mn = fmaxf(fmaxf(m, mb + HEADROOM), floor);
  al = ex2(m - mn);
  m = mn;
  return mb;
}

template <bool MASKED>
__device__ __forceinline__ void softmax_after_max(
    int* s, float mx0, float mx1, float& m0, float& m1, float& l0, float& l1, float& al0,
    float& al1, float c0, float c1, int col0, int tq, int keys, float floor0, float floor1) {
  // s: block_max's output in, its fp32 P = exp2(score - new m) out (as bits); m is raised to
  // at least `floor` (static_max)
  const float mb0 = raise_max(mx0, c0, m0, al0, floor0);
  const float mb1 = raise_max(mx1, c1, m1, al1, floor1);
  const float off0 = (mb0 - m0) - mx0 * c0, off1 = (mb1 - m1) - mx1 * c1;
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int i = 0; i < 64; ++i) {
    bool row1 = (i & 2) != 0;
    float x = fmaf(__int_as_float(s[i]), row1 ? c1 : c0, row1 ? off1 : off0);
    if (MASKED && col0 + 8 * (i >> 2) + 2 * tq + (i & 1) >= keys) x = NEG_INF;
    float p = DIAG == 2 ? x : ex2(x);
    s[i] = __float_as_int(p);
    if (!ROWSUM_MMA) {
      if (row1) sum1 += p; else sum0 += p;
    }
  }
  if (!ROWSUM_MMA) {
    l0 = l0 * al0 + sum0;
    l1 = l1 * al1 + sum1;
  }
}

template <bool MASKED>
__device__ __forceinline__ void softmax_block(
    int* s, float& m0, float& m1, float& l0, float& l1, float& al0, float& al1,
    float c0, float c1, int col0, int tq, int keys) {
  // s: the block's exact int32 scores in, its fp32 P = exp2(score - new max) out (as bits)
  float mx0, mx1;
  block_max<MASKED>(s, PRELOAD, col0, tq, keys, mx0, mx1);
  softmax_after_max<MASKED>(s, mx0, mx1, m0, m1, l0, l1, al0, al1, c0, c1, col0, tq, keys,
                            NEG_INF, NEG_INF);
}

__device__ __forceinline__ void pack_p(const int* s, u32* pa) {
  // the fp32 P accumulator registers are the bf16 A operand's, two columns per register
#pragma unroll
  for (int i = 0; i < 32; ++i) pa[i] = pack_bf16(__int_as_float(s[2 * i]), __int_as_float(s[2 * i + 1]));
}

// PRELOAD: the score accumulator starts from the bits of 1.5 * 2^23, so the exact int32 result
// already reads as the float 1.5 * 2^23 + score and the softmax skips one integer add per score.
// ptxas places the 64 register moves after the warpgroup's turn barrier, right before its
// Q.K^T; with PRESET_LDS 16 shared-memory loads of those bits (`magic`, MAGIC_OFF) set them
// instead: a load cannot cross the barrier, and each reads its own 16 bytes (ptxas merges loads
// of one address into one and copies registers after the barrier again).
__device__ __forceinline__ void preload_scores(int* s, u32 magic) {
#if PRESET_LDS
#pragma unroll
  for (int i = 0; i < 16; ++i)
    asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(s[4 * i]), "=r"(s[4 * i + 1]), "=r"(s[4 * i + 2]), "=r"(s[4 * i + 3])
                 : "r"(magic + 16 * i));
#else
#pragma unroll
  for (int i = 0; i < 64; ++i) s[i] = MAGIC_BITS;
#endif
}

__device__ __forceinline__ void issue_scores(int* s, u64 dq, u64 dk, bool preset) {
  // preset: s holds preload_scores' start value, accumulated onto; else the product starts at 0
  wg_fence();
  wgmma_s8(s, dq, dk, preset);
  wgmma_s8(s, dq + 2, dk + 2, 1);
  wgmma_s8(s, dq + 4, dk + 4, 1);
  wgmma_s8(s, dq + 6, dk + 6, 1);
  wg_commit();
}

__device__ __forceinline__ void issue_pv(float* acc, const u32* pa, u32 vt) {
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 8; ++kk)
#if V_DIRECT   // 16 keys = 2 KB of 128-byte rows per step
    wgmma_bf16_t(acc, pa + 4 * kk, desc_mn_sw128(vt) + 128 * kk);
#else
    wgmma_bf16(acc, pa + 4 * kk, desc_sw128(vt + (kk >> 2) * V_HALF) + 2 * (kk & 3));
#endif
  wg_commit();
}

__device__ __forceinline__ void issue_scores_rs(int* s, const u32* qa, u64 dk) {
  // the query operand from registers (Q_REGS, load_q_fragments), onto the preset s (DIAG 3:
  // from zero, no preset)
  wg_fence();
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) wgmma_s8_rs(s, qa + 4 * kk, dk + 2 * kk, DIAG != 3 || kk > 0);
  wg_commit();
}

__device__ __forceinline__ void first_scores(int* s, bool preset, u64 dq, const u32* qa,
                                             u32 k_ring, u32 full_k, u32 empty_k) {
  // Q.K^T of key block 0, waited for; its K slot released
  if (preset) preload_scores(s, k_ring + MAGIC_OFF);   // k_ring is the shared memory's base
  mbar_wait(full_k, 0);
#if Q_REGS
  issue_scores_rs(s, qa, desc_sw128(k_ring));
#else
  issue_scores(s, dq, desc_sw128(k_ring), preset);
#endif
  wg_wait0();
#pragma unroll
  for (int i = 0; i < 64; ++i) fence_r(s[i]);
  release(empty_k);
}

__device__ __forceinline__ void wg_wait1() {
  asm volatile("wgmma.wait_group.sync.aligned 1;" ::: "memory");
}
__device__ __forceinline__ void named_arrive(u32 id, u32 count) {
  asm volatile("bar.arrive %0, %1;" :: "r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void scale_rows(float* acc, float a0, float a1) {
  // a factor is exactly 1 when the block did not raise the row's maximum (exp2(0)); a warp
  // whose 16 rows all kept theirs skips the 64 multiplications (bit for bit the same result)
  if (SKIP_ONES && __all_sync(0xffffffff, a0 == 1.f && a1 == 1.f)) return;
#pragma unroll
  for (int i = 0; i < NACC / 4; ++i) {
    acc[4 * i] *= a0; acc[4 * i + 1] *= a0; acc[4 * i + 2] *= a1; acc[4 * i + 3] *= a1;
  }
}

"""

_ENTRY = r"""
extern "C" __global__ void __launch_bounds__(384, 1) CLUSTER_DIMS
attn_int8_bf16_ws(const __grid_constant__ TensorMap k_map, const __grid_constant__ TensorMap v_map,
                  const u16* __restrict__ Q, const float* __restrict__ k_scale,
                  const float* __restrict__ v_scale, const float* __restrict__ k_bound,
                  u16* __restrict__ O, int n_q, int keys, int padded, int heads, float factor,
                  long long s_qb, long long s_ql, long long s_qh,
                  long long s_ob, long long s_ol, long long s_oh) {
  extern __shared__ __align__(1024) unsigned char smem_raw[];
  unsigned char* smem = (unsigned char*)(((u64)smem_raw + 1023) & ~(u64)1023);
  const u32 base = smem_u32(smem);
  const u32 k_ring = base, v_ring = base + STAGES * K_BYTES, bars = base + BAR_OFF;
  // barriers: full K, empty K, full V, empty V (STAGES each, 8 bytes apiece)
  const u32 full_k = bars, empty_k = bars + 8 * STAGES;
  const u32 full_v = bars + 16 * STAGES, empty_v = bars + 24 * STAGES;
  const int tid = threadIdx.x, wg = tid >> 7, t = tid & 127;
  const int bh = blockIdx.y, b = bh / heads, h = bh % heads;
  const int n_blocks = (keys + BLOCK_N - 1) / BLOCK_N;
  if (tid == 0) {
    for (int i = 0; i < STAGES; ++i) {
      mbar_init(full_k + 8 * i, 1);
      mbar_init(full_v + 8 * i, 1);
      mbar_init(empty_k + 8 * i, 256);
      mbar_init(empty_v + 8 * i, 256);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  if (PRESET_LDS && tid < 64)   // read after the cluster barrier below
    asm volatile("st.shared.b32 [%0], %1;" :: "r"(base + MAGIC_OFF + 4 * tid), "r"(MAGIC_BITS)
                 : "memory");
  if (ROWSUM_MMA) {  // the ones (bf16 1.0) of each slot, read by the async proxy
    for (int i = tid; i < STAGES * ONES_WORDS; i += THREADS) {
      const int slot = i / ONES_WORDS, w = i % ONES_WORDS;
#if V_DIRECT
      u32 addr = v_ring + slot * V_SLOT + 2 * V_BOX + w * 4;
#else   // 8 rows after each V^T half
      u32 addr = v_ring + slot * V_SLOT + (w >> 8) * V_HALF + V_BYTES / 2 + (w & 255) * 4;
#endif
      asm volatile("st.shared.b32 [%0], %1;" :: "r"(addr), "r"(0x3f803f80u) : "memory");
    }
    asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  }
  cluster_sync();

  if (wg == 0) {  // producer: thread 0 streams K tiles, thread 32 V^T tiles
    asm volatile("setmaxnreg.dec.sync.aligned.u32 24;");
    if (t == 0 || t == 32) {
      const bool is_k = t == 0;
      const u32 rank = cta_rank();
      for (int j = 0; j < n_blocks; ++j) {
        int st = j % STAGES;
        u32 ph = (u32)(j / STAGES) & 1;
        if (DIAG == 1 && j >= STAGES) {  // timing only: the slot keeps its old tile
          mbar_wait((is_k ? empty_k : empty_v) + 8 * st, ph ^ 1);
          mbar_arrive((is_k ? full_k : full_v) + 8 * st);
        } else if (is_k) {
          mbar_wait(empty_k + 8 * st, ph ^ 1);
          mbar_expect(full_k + 8 * st, K_BYTES);
          load_k(k_ring + st * K_BYTES, &k_map, bh * padded + j * BLOCK_N, full_k + 8 * st, rank);
        } else {
          mbar_wait(empty_v + 8 * st, ph ^ 1);
          mbar_expect(full_v + 8 * st, V_BYTES);
          u32 dst = v_ring + st * V_SLOT;
#if PV_INT8
          tma_2d(dst, &v_map, j * BLOCK_N, bh * HEAD_DIM, full_v + 8 * st);
#elif V_DIRECT
          load_v_direct(dst, &v_map, j * BLOCK_N, h, b, full_v + 8 * st, rank);
#else
          load_v(dst, &v_map, j * BLOCK_N, bh * HEAD_DIM, full_v + 8 * st, rank);
#endif
        }
      }
    }
    return;
  }
  asm volatile("setmaxnreg.inc.sync.aligned.u32 240;");
  const int half = wg - 1;
  const u32 q_smem = base + Q_OFF + half * (64 * HEAD_DIM);
  float* qscale = (float*)(smem + QS_OFF) + half * 64;
  float* qbound = (float*)(smem + QB_OFF) + half * 64;
  const int q0 = blockIdx.x * BLOCK_M + half * 64;
  quantize_queries(Q, q_smem, qscale, qbound, wg, t, q0, n_q,
                   (long long)b * s_qb + (long long)h * s_qh, s_ql, factor);

  const int warp = t >> 5, lane = t & 31, g = lane >> 2, tq = lane & 3;
  const float qs0 = qscale[warp * 16 + g], qs1 = qscale[warp * 16 + g + 8];
  const float kb = STATIC_MAX ? k_bound[bh] : 0.f;
  const float bound0 = qbound[warp * 16 + g] * kb, bound1 = qbound[warp * 16 + g + 8] * kb;
  const float* ks_ptr = k_scale + (long long)bh * (padded / BLOCK_N);
  consume(k_ring, v_ring, full_k, empty_k, full_v, empty_v, q_smem, qs0, qs1, bound0, bound1,
          ks_ptr, v_scale + (long long)bh * HEAD_DIM, n_blocks, keys, wg, warp, g, tq,
          q0 + warp * 16 + g, n_q, O + (long long)b * s_ob + (long long)h * s_oh, s_ol);
#if MULTICAST
  cluster_sync();   // the peer may still arrive on this CTA's empty barriers until here
#endif
}
"""


def shared_bytes(stages: int, pv_int8: bool = False, v_direct: bool = False) -> int:
    """Dynamic shared memory of a launch: the K / V rings (with the ones of the row sums), the
    INT8 query tiles, their scales and bounds, the barriers, the preset's 256 bytes, and 1 KB to
    align the base for the 128-byte swizzle."""
    tile = BLOCK_N * HEAD_DIM
    if pv_int8:
        ring = stages * 2 * tile
    else:
        ring = stages * (4 * tile if v_direct else 3 * tile + 2048)
    return ring + BLOCK_M * HEAD_DIM + BLOCK_M * 8 + 32 * stages + 256 + 1024


@functools.lru_cache(maxsize=None)
def source(stages: int, diag: int = 0, pingpong: bool = False, preload: bool = True,
           skip_ones: bool = True, rowsum_mma: bool = True, pv_int8: bool = False,
           pv8_overlap: bool = False, lazy_max: bool = True, q_regs: bool = True,
           multicast: bool = False, static_max: bool = True, preset_lds: bool = True,
           v_direct: bool = False) -> str:
    """The whole translation unit for a ring of `stages` K and V slots. `diag` (timing only,
    wrong results): 1 loads no K/V tile after the ring's first fill, 2 computes no exp2, 3
    starts the scores from zero instead of the preset and skips the lazy maximum's test, 4 skips
    that test only (3 and 4 with lazy_max and q_regs), 5 takes the static loop whatever the
    bound; 6 (static_max, tests) writes 1 where a warpgroup took the static loop, 0 where the
    lazy one, into every output element. The options (defaults as shipped; bench/attention.py
    --diagnose times each one off or on): `pingpong` (off since the twelfth session: 1.5-2.5%
    slower with the preset loaded from shared memory), the two consumer warpgroups take turns
    issuing their products; `preload` and `skip_ones` (exact), see preload_scores and scale_rows;
    `rowsum_mma`, the row sums come from P.V with 8 columns of ones (the sums of the bf16 P the
    products use; no adds in the softmax); `lazy_max` and `q_regs` (bf16 P.V; lazy_max needs
    preload), see attention_int8_cuda_lazy. `pv_int8`: INT8 P.V (attention_int8_cuda_pv8; its
    own exact shortcuts, neither lazy_max nor q_regs), with `pv8_overlap` the softmax of block j
    under P.V[j-1] (FA3's order; ptxas spills 64 bytes). `multicast` (bf16 P.V): CTA pairs share
    the K/V tiles (attention_int8_cuda_cluster; the launcher's default from MULTICAST_MIN_KEYS).
    `static_max` (bf16 P.V, with lazy_max and rowsum_mma; the launch then passes the key
    bounds): m fixed after block 0 from a bound on the scores, no per-block test
    (attention_int8_cuda_static). `preset_lds` (on): the preset scores loaded from shared memory
    instead of set by 64 register moves (preload_scores). `v_direct` (bf16 P.V, off): V read as
    it is, MN-major, instead of quantize_kv's V^T (attention_int8_cuda_vdirect; the launcher
    sets it when handed V itself)."""
    rowsum_mma = rowsum_mma and not pv_int8
    lazy_max, q_regs = lazy_max and not pv_int8, q_regs and not pv_int8
    multicast, v_direct = multicast and not pv_int8, v_direct and not pv_int8
    static_max = static_max and lazy_max and rowsum_mma
    if (lazy_max or q_regs) and not preload:
        raise ValueError("lazy_max and q_regs start the scores from preload_scores' value")
    defines = (f"#define STAGES {stages}\n#define PINGPONG {int(pingpong)}\n#define DIAG {diag}\n"
               f"#define PRELOAD {int(preload)}\n"
               f"#define SKIP_ONES {int(skip_ones)}\n#define ROWSUM_MMA {int(rowsum_mma)}\n"
               f"#define THREADS {THREADS}\n#define BLOCK_M {BLOCK_M}\n#define BLOCK_N {BLOCK_N}\n"
               f"#define HEAD_DIM {HEAD_DIM}\n#define PV_INT8 {int(pv_int8)}\n"
               f"#define PV8_OVERLAP {int(pv8_overlap)}\n#define LAZY_MAX {int(lazy_max)}\n"
               f"#define Q_REGS {int(q_regs)}\n#define LAZY_SLACK 8.0f\n"
               f"#define MULTICAST {int(multicast)}\n#define STATIC_MAX {int(static_max)}\n"
               f"#define PRESET_LDS {int(preset_lds and preload)}\n"
               f"#define V_DIRECT {int(v_direct)}\n"
               f"#define HEADROOM (LAZY_MAX ? LAZY_SLACK : 0.f)\n")
    # the bf16 helpers are compiled in either way (unused inline functions cost nothing)
    n = 136 if rowsum_mma else 128
    products = (ptx.wgmma_int8() + ptx.wgmma_bf16(n) + ptx.wgmma_bf16(n, transpose_b=True)
                + ptx.wgmma_int8(a_in_registers=True))
    consume = pv8.CONSUME_INT8 if pv_int8 else loop.CONSUME_BF16
    return (defines + ptx.PRELUDE + products + _LAYOUT + cluster.CLUSTER + vdirect.VDIRECT
            + _HELPERS + lazy.LAZY + static.STATIC + consume + _ENTRY)
