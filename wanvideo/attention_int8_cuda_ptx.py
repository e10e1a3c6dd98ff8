"""PTX building blocks of the CUDA attention kernels (attention_int8_cuda_source): the type
names, shared-memory addresses, mbarriers, TMA, wgmma fences / commits / waits and the wgmma
instructions themselves, as CUDA C++ text for NVRTC. The wgmma operand lists (64 or more
accumulator registers each) are generated here in Python."""
from __future__ import annotations


def _regs(first: int, count: int) -> str:
    return ", ".join(f"%{i}" for i in range(first, first + count))


def wgmma_int8(a_in_registers: bool = False) -> str:
    """acc[64] int32 (+)= A . B (desc, K-major), m64n128k32, s8 x s8: A from shared memory
    (desc; `wgmma_s8`, scale_d 0 starts from zero) or from 4 registers of 4 int8
    (`wgmma_s8_rs`, accumulating unless scale_d is 0)."""
    outs = ", ".join(f'"+r"(d[{i}])' for i in range(64))
    if a_in_registers:
        name, params = "wgmma_s8_rs", "const u32* a, u64 db, int scale_d"
        a_operand = "{%64, %65, %66, %67}"
        ins = '"r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(scale_d)'
        pred = "%69"
        b_operand = "%68"
    else:
        name, params, a_operand = "wgmma_s8", "u64 da, u64 db, int scale_d", "%64"
        ins, pred, b_operand = '"l"(da), "l"(db), "r"(scale_d)', "%66", "%65"
    return f"""
__device__ __forceinline__ void {name}(int* d, {params}) {{
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, {pred}, 0;\\n"
    "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {{{_regs(0, 64)}}}, {a_operand}, "
    "{b_operand}, p;\\n}}\\n"
    : {outs} : {ins});
}}"""


def wgmma_bf16(n: int, transpose_b: bool = False) -> str:
    """acc[n / 2] fp32 += A (4 registers of bf16 pairs) . B (desc), m64n{n}k16: `wgmma_bf16`
    with B K-major, `wgmma_bf16_t` with B MN-major (attention_int8_cuda_vdirect)."""
    regs = n // 2
    name = "wgmma_bf16_t" if transpose_b else "wgmma_bf16"
    outs = ", ".join(f'"+f"(d[{i}])' for i in range(regs))
    a = ", ".join(f"%{regs + i}" for i in range(4))
    return f"""
__device__ __forceinline__ void {name}(float* d, const u32* a, u64 db) {{
  asm volatile("{{\\n.reg .pred p;\\nsetp.ne.b32 p, 1, 0;\\n"
    "wgmma.mma_async.sync.aligned.m64n{n}k16.f32.bf16.bf16 {{{_regs(0, regs)}}}, "
    "{{{a}}}, %{regs + 4}, p, 1, 1, {int(transpose_b)};\\n}}\\n"
    : {outs} : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}}"""


PRELUDE = r"""
typedef unsigned int u32;
typedef unsigned long long u64;
typedef unsigned short u16;
struct __align__(64) TensorMap { u64 bits[16]; };

#define MAGIC_BITS 0x4B400000
#define MAGIC 12582912.0f

__device__ __forceinline__ u32 smem_u32(const void* p) {
  return (u32)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
               :: "r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  u32 done = 0;
  while (!done) {
    asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                 "selp.u32 %0, 1, 0, p;\n}\n" : "=r"(done) : "r"(bar), "r"(parity) : "memory");
  }
}
__device__ __forceinline__ void tma_2d(u32 dst, const TensorMap* map, int x, int y, u32 bar) {
  asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
               " [%0], [%1, {%2, %3}], [%4];"
               :: "r"(dst), "l"((u64)map), "r"(x), "r"(y), "r"(bar) : "memory");
}
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() {
  asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory");
}
__device__ __forceinline__ void wg_wait0() {
  asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
}
// Keeps the compiler from moving register reads or writes across a wgmma wait: the registers
// an asynchronous wgmma reads or writes are only safe to touch after its wait.
__device__ __forceinline__ void fence_f(float& r) { asm volatile("" : "+f"(r) :: "memory"); }
__device__ __forceinline__ void fence_r(int& r) { asm volatile("" : "+r"(r) :: "memory"); }
__device__ __forceinline__ void fence_u(u32& r) { asm volatile("" : "+r"(r) :: "memory"); }
// Shared-memory matrix descriptor, K-major, 128-byte swizzle: 8-row groups 1024 bytes apart.
__device__ __forceinline__ u64 desc_sw128(u32 addr) {
  return (u64)((addr & 0x3FFFF) >> 4) | ((u64)1 << 16) | ((u64)(1024 >> 4) << 32) | ((u64)1 << 62);
}
__device__ __forceinline__ float ex2(float x) {
  float y; asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x)); return y;
}
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
  u32 r; asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo)); return r;
}
__device__ __forceinline__ float bf16_to_f32(u32 bits16) { return __int_as_float(bits16 << 16); }
__device__ __forceinline__ void named_sync(u32 id, u32 count) {
  asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(count) : "memory");
}
"""
