"""Launcher of the CUDA 8-bit attention kernel (attention_int8_cuda_source): Hopper, head dim
128, bf16, INT8 Q.K^T and bf16 P.V with two consumer warpgroups per CTA.

The kernel is compiled by NVRTC on first use (about a second) and loaded once per device
(cuda_runtime); K arrives from quantize_kv as INT8 [B*H, padded, 128] with per-block scales, V as
bf16 V^T [B*H, 128, padded], both read by TMA. `unsupported` says why a call cannot run here
(attention_int8 then uses its other kernels).
"""
from __future__ import annotations

import ctypes
import functools
import math
import types

import torch

from . import attention_int8_cuda_source as source
from . import cuda_runtime

STAGES = (2, 3)
# From this many keys, CTAs of neighbouring query tiles work in pairs that share every K/V tile
# by TMA multicast (attention_int8_cuda_cluster): H200, 32,760 keys 1-1.5% faster, 8,100 keys
# 4-7% slower (the pair waits for its slower CTA), bit-identical output (docs/ATTENTION_8BIT.md)
MULTICAST_MIN_KEYS = 16384
# attention_int8_cuda_source.source options every bf16 launch takes unless the call names them
# (empty: the source's defaults; bench/attention_variants.py and the "int8@cuda:..." bench
# switch time candidates by filling it)
KERNEL_OPTIONS: dict = {}
# V read as it is by the kernel instead of quantize_kv's V^T copy (attention_int8_cuda_vdirect).
# Off: on an H200 the kernel lost what the K/V pass saved (docs/ATTENTION_8BIT.md, twelfth
# session); bench switch "int8@cuda:v_direct=1"
V_DIRECT = False


def reads_v(v: torch.Tensor) -> bool:
    """Whether the bf16 P.V kernel takes `v` [B, keys, H, 128] itself (V_DIRECT and a layout TMA
    can read: bf16, 16-byte aligned pointer and strides, channels contiguous), so quantize_kv
    writes no V^T."""
    return V_DIRECT and v.dtype == torch.bfloat16 and v.dim() == 4 and _tma_readable(v)


def _tma_readable(v: torch.Tensor) -> bool:
    """16-byte aligned pointer and outer strides (bf16), channels contiguous."""
    return (v.stride(-1) == 1 and v.data_ptr() % 16 == 0
            and all(s % 8 == 0 for s in v.stride()[:-1]))


def unsupported(q: torch.Tensor, out: torch.Tensor | None = None) -> str | None:
    """None when the CUDA kernel takes q (and writes out) on q's device, else why not."""
    if q.device.type != "cuda":
        return "the CUDA kernel needs a CUDA device"
    major, _ = torch.cuda.get_device_capability(q.device)
    if major != 9:
        return f"the CUDA kernel is for Hopper (sm_90), not sm_{major}x"
    if q.shape[-1] != source.HEAD_DIM:
        return f"the CUDA kernel takes head dim {source.HEAD_DIM}, not {q.shape[-1]}"
    if q.dtype != torch.bfloat16:
        return f"the CUDA kernel takes bf16, not {q.dtype}"
    for name, t in (("q", q), ("out", out)):
        if t is not None and (t.data_ptr() % 16 or any(s % 8 for s in t.stride()[:-1])
                              or t.stride(-1) != 1):
            return f"{name}'s pointer or strides are not 16-byte aligned"
    return None


@functools.lru_cache(maxsize=None)
def cubin(stages: int, diag: int = 0, options: tuple = ()) -> bytes:
    """The compiled kernel (sm_90a) for a ring of `stages` slots; `diag` and `options`
    (name, value) pairs as attention_int8_cuda_source.source takes them (bench only). Raises
    CudaRuntimeError."""
    binary, _log = cuda_runtime.compile_cubin(source.source(stages, diag, **dict(options)),
                                              "attention_int8.cu")
    return binary


def aot_compile(config: dict) -> types.SimpleNamespace:
    """The kernel of a launch config compiled without a GPU, shaped like a Triton compiled
    kernel for the compile tests (asm["cubin"])."""
    options = (("pv_int8", True),) if config["pv"] == "int8" else ()
    return types.SimpleNamespace(asm={"cubin": cubin(config["num_stages"], 0, options)})


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int, stages: int, diag: int, options: tuple) -> cuda_runtime.Kernel:
    chosen = dict(options)
    shared = source.shared_bytes(stages, chosen.get("pv_int8", False),
                                 chosen.get("v_direct", False))
    return cuda_runtime.Kernel(cubin(stages, diag, options), source.KERNEL_NAME,
                               torch.device("cuda", device_index), shared)


def attention(q: torch.Tensor, k_int: torch.Tensor, k_scale: torch.Tensor, v_t: torch.Tensor,
              out: torch.Tensor, keys: int, factor: float, stages: int = 3, diag: int = 0,
              v_scale: torch.Tensor | None = None, k_bound: torch.Tensor | None = None,
              **options) -> cuda_runtime.Kernel:
    """out [B, Lq, H, 128] = attention of q over quantize_kv's INT8 K and V^T for `keys` real
    keys: bf16 V^T, or V itself, bf16 [B, keys, H, 128] as reads_v takes it (bf16 P.V), or with
    `v_scale` (fp32 [B*H, 128]) INT8 V^T in the Gluon key order (INT8 P.V). Returns the
    launched kernel. `diag` and `options`: see cubin; `multicast` defaults to keys >=
    MULTICAST_MIN_KEYS (bf16 P.V); `static_max` (bf16 P.V) defaults to whether `k_bound`,
    quantize_kv's largest key norm per (batch, head) (fp32 [B*H]), is given, and needs it."""
    if stages not in STAGES:
        raise ValueError(f"stages {stages} not in {STAGES}")
    bh, padded, d = k_int.shape
    int8 = v_scale is not None
    b, n_q, heads, _ = q.shape
    if v_t.dim() == 4 and not int8:
        options["v_direct"] = True
    if int8:
        options["pv_int8"] = True
    else:
        options.setdefault("multicast", keys >= MULTICAST_MIN_KEYS)
        options.setdefault("static_max", k_bound is not None)
        for key, value in KERNEL_OPTIONS.items():
            options.setdefault(key, value)
        if options["static_max"] and (k_bound is None or k_bound.shape != (bh,)
                                      or k_bound.dtype != torch.float32
                                      or k_bound.device != q.device):
            got = None if k_bound is None else (k_bound.dtype, tuple(k_bound.shape),
                                                str(k_bound.device))
            raise ValueError(f"static_max needs the key bounds, fp32 [{bh}] on {q.device}, "
                             f"got {got}")
    v_map = _v_map(v_t, int8, (b, keys, heads, d), padded)
    kernel = _kernel(q.device.index, stages, int(diag), tuple(sorted(options.items())))
    pair = options.get("multicast", False) and not int8   # a CTA loads half of each K tile
    k_map = cuda_runtime.tensor_map_2d(k_int, bh * padded, d, source.BLOCK_N // (1 + pair), d, 1)
    ll, ptr = ctypes.c_longlong, ctypes.c_void_p
    args = [k_map, v_map, ptr(q.data_ptr()), ptr(k_scale.data_ptr()),
            ptr((v_scale if int8 else k_scale).data_ptr()),
            ptr((k_scale if k_bound is None else k_bound).data_ptr()), ptr(out.data_ptr()),
            ctypes.c_int(n_q), ctypes.c_int(keys), ctypes.c_int(padded), ctypes.c_int(heads),
            ctypes.c_float(factor), ll(q.stride(0)), ll(q.stride(1)), ll(q.stride(2)),
            ll(out.stride(0)), ll(out.stride(1)), ll(out.stride(2))]
    tiles = math.ceil(n_q / source.BLOCK_M)
    kernel.launch((tiles + (tiles % 2 if pair else 0), bh, 1), source.THREADS, args)
    return kernel


def _v_map(v: torch.Tensor, int8: bool, shape: tuple, padded: int) -> cuda_runtime.TensorMapBytes:
    """V's tensor map: V itself (4-D, bf16 P.V; channels, heads, keys, batch in boxes of 64
    channels x 128 keys), bf16 V^T in 64-key boxes or INT8 V^T in 128-key ones; a V the kernel
    cannot read is a ValueError."""
    b, keys, heads, d = shape
    dtype = torch.int8 if int8 else torch.bfloat16
    if v.dim() == 4 and not int8:
        if tuple(v.shape) != shape or v.dtype != dtype or not _tma_readable(v):
            raise ValueError(f"V must be {dtype} {shape} with 16-byte aligned pointer and "
                             f"strides, got {v.dtype} {tuple(v.shape)} strides {tuple(v.stride())}")
        return cuda_runtime.tensor_map(v, (d, heads, keys, b),
                                       tuple(2 * v.stride(i) for i in (2, 1, 0)),
                                       (64, 1, source.BLOCK_N, 1), 2)
    if tuple(v.shape) != (b * heads, d, padded) or v.dtype != dtype:
        raise ValueError(f"V^T must be {dtype} {(b * heads, d, padded)}, got {v.dtype} "
                         f"{tuple(v.shape)}")
    return cuda_runtime.tensor_map_2d(v, b * heads * d, padded, d,
                                      source.BLOCK_N if int8 else 64, 1 if int8 else 2)
