"""K/V tile loading of the CUDA attention kernel (attention_int8_cuda_source), alone or shared by
a pair of CTAs (`multicast`, bf16 P.V only).

Why a pair: every CTA of one (batch, head) reads the same K and V^T tiles, 48 KB per 128-key
block, and at 32,760 tokens the whole grid pulls ~130 GB out of L2 in ~26 ms; with the loads
removed the kernel runs 3.5 ms faster (docs/ATTENTION_8BIT.md, ninth session). Two CTAs of
neighbouring query tiles form a cluster (compile-time __cluster_dims__, so a plain launch
works) and each issues half of every tile with TMA multicast, which writes it into both CTAs'
shared memory at the same offsets and signals both CTAs' full barriers: L2 serves each tile
once per pair.

A slot may be refilled only when the consumers of both CTAs are done with it. Each consumer
thread still arrives once per slot, the even lanes on CTA 0's empty barrier and the odd lanes
on CTA 1's, so each barrier keeps its 256 arrivals (128 per CTA) and every warp of both CTAs is
covered (a warp releases a slot with one instruction, all lanes converged). The full barriers
expect the whole tile's bytes, both halves. The consumers leave through a cluster barrier so
that no CTA exits while its peer may still arrive on its barriers.
"""
from __future__ import annotations

CLUSTER = r"""
#if MULTICAST
#define CLUSTER_DIMS __cluster_dims__(2, 1, 1)
#else
#define CLUSTER_DIMS
#endif

__device__ __forceinline__ u32 cta_rank() {
#if MULTICAST
  u32 r; asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r)); return r;
#else
  return 0;
#endif
}

__device__ __forceinline__ void tma_2d_pair(u32 dst, const TensorMap* map, int x, int y,
                                            u32 bar) {
  // into the same offsets of both CTAs of the pair, completing bytes on both barriers
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
               ".multicast::cluster [%0], [%1, {%2, %3}], [%4], %5;"
               :: "r"(dst), "l"((u64)map), "r"(x), "r"(y), "r"(bar), "h"((unsigned short)3)
               : "memory");
}

__device__ __forceinline__ void load_k(u32 dst, const TensorMap* map, int row, u32 bar,
                                       u32 rank) {
  // one INT8 K tile of BLOCK_N rows; with MULTICAST this CTA's half of them (the map's box
  // is BLOCK_N / 2 rows; the 128-byte swizzle repeats every 8 rows, so halves line up)
#if MULTICAST
  tma_2d_pair(dst + rank * (K_BYTES / 2), map, 0, row + (int)rank * (BLOCK_N / 2), bar);
#else
  tma_2d(dst, map, 0, row, bar);
#endif
}

__device__ __forceinline__ void load_v(u32 dst, const TensorMap* map, int key, int row, u32 bar,
                                       u32 rank) {
  // one bf16 V^T tile as two 64-key halves, V_HALF bytes apart; with MULTICAST one half each
#if MULTICAST
  tma_2d_pair(dst + rank * V_HALF, map, key + 64 * (int)rank, row, bar);
#else
  tma_2d(dst, map, key, row, bar);
  tma_2d(dst + V_HALF, map, key + 64, row, bar);
#endif
}

__device__ __forceinline__ void release(u32 bar) {
  // a consumer thread is done with a slot (see the module's docstring for the lane split)
#if MULTICAST
  u32 remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(bar), "r"(threadIdx.x & 1));
  // CTA-scope release, as for a local arrive: a cluster-scope one costs a GPU-wide memory
  // barrier per thread and slot (measured 30% slower)
  asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];" :: "r"(remote) : "memory");
#else
  mbar_arrive(bar);
#endif
}

__device__ __forceinline__ void cluster_sync() {
  // MULTICAST: every non-exited thread of both CTAs (this also publishes the barrier inits to
  // the peer); otherwise the CTA's own barrier
#if MULTICAST
  asm volatile("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;" ::: "memory");
#else
  __syncthreads();
#endif
}
"""
