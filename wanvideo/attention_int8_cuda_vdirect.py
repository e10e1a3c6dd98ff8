"""V read by the CUDA attention kernel straight from the attention's input (`v_direct`, bf16
P.V): no V^T copy in the K/V pass.

Why: the K/V pass (quantize_kv) wrote V^T, a bf16 [B*H, 128, padded] copy, because P.V's B
operand was read K-major (keys contiguous). That copy is most of the pass's traffic (V read and
written once more: ~0.12 ms of 1.77 at 8,100 tokens on an H200). wgmma also reads a bf16 B operand
MN-major (`imm-trans-b`), i.e. with the head-dim channels contiguous, which is V's own layout
[B, keys, H, 128]. A 4-D tensor map (channels, heads, keys, batch; box 64 x 1 x 128 x 1) brings
each 128-key tile in as two 16 KB boxes of 64 channels, 128-byte rows swizzled as the wgmma
expects; keys past the end are zero-filled by TMA, so nothing is padded.

The descriptor of an MN-major operand with the 128-byte swizzle: 8-row groups along K (keys)
1024 bytes apart (stride byte offset), 64-channel atoms along N LBO bytes apart (leading byte
offset, V_BOX here). The row sums (ROWSUM_MMA's 8 columns of ones) become a third atom of ones
after the two boxes, 16 KB per ring slot filled once at the start (only its first 8 columns are
read, at every swizzle position, so the whole atom holds ones).

Off by default (attention_int8_cuda.V_DIRECT): bit-identical, and the K/V pass drops from 0.118
to 0.089 ms at 8,100 tokens on an H200, but the kernel reading V's 256-byte rows H * 256 bytes
apart runs 1-4% slower, which takes back what the pass saves (docs/ATTENTION_8BIT.md).
"""
from __future__ import annotations

VDIRECT = r"""
#if V_DIRECT
__device__ __forceinline__ void tma_4d(u32 dst, const TensorMap* map, int c, int h, int key,
                                       int b, u32 bar) {
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%2, %3, %4, %5}], [%6];"
               :: "r"(dst), "l"((u64)map), "r"(c), "r"(h), "r"(key), "r"(b), "r"(bar)
               : "memory");
}

__device__ __forceinline__ void tma_4d_pair(u32 dst, const TensorMap* map, int c, int h, int key,
                                            int b, u32 bar) {
  asm volatile("cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
               ".multicast::cluster [%0], [%1, {%2, %3, %4, %5}], [%6], %7;"
               :: "r"(dst), "l"((u64)map), "r"(c), "r"(h), "r"(key), "r"(b), "r"(bar),
                  "h"((unsigned short)3) : "memory");
}

__device__ __forceinline__ void load_v_direct(u32 dst, const TensorMap* map, int key, int h,
                                              int b, u32 bar, u32 rank) {
  // one 128-key V tile as two boxes of 64 channels, V_BOX bytes apart; with MULTICAST one each
#if MULTICAST
  tma_4d_pair(dst + rank * V_BOX, map, 64 * (int)rank, h, key, b, bar);
#else
  tma_4d(dst, map, 0, h, key, b, bar);
  tma_4d(dst + V_BOX, map, 64, h, key, b, bar);
#endif
}

__device__ __forceinline__ u64 desc_mn_sw128(u32 addr) {
  // MN-major, 128-byte swizzle: 64-channel atoms V_BOX apart, 8-key groups 1024 bytes apart
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)(V_BOX >> 4) << 16) | ((u64)(1024 >> 4) << 32) |
         ((u64)1 << 62);
}
#endif
"""
