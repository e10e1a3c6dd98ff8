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
# The scores' preset loaded from shared memory (source's `preset_lds`); off until a GPU run
# times it against the register moves (bench switch "int8@preset")
PRESET_LDS = False


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
    shared = source.shared_bytes(stages, dict(options).get("pv_int8", False))
    return cuda_runtime.Kernel(cubin(stages, diag, options), source.KERNEL_NAME,
                               torch.device("cuda", device_index), shared)


def attention(q: torch.Tensor, k_int: torch.Tensor, k_scale: torch.Tensor, v_t: torch.Tensor,
              out: torch.Tensor, keys: int, factor: float, stages: int = 3, diag: int = 0,
              v_scale: torch.Tensor | None = None, k_bound: torch.Tensor | None = None,
              **options) -> cuda_runtime.Kernel:
    """out [B, Lq, H, 128] = attention of q over quantize_kv's INT8 K and V^T for `keys` real
    keys: bf16 V^T, or with `v_scale` (fp32 [B*H, 128]) INT8 V^T in the Gluon key order (INT8
    P.V). Returns the launched kernel. `diag` and `options`: see cubin; `multicast` defaults to
    keys >= MULTICAST_MIN_KEYS (bf16 P.V); `static_max` (bf16 P.V) defaults to whether
    `k_bound`, quantize_kv's largest key norm per (batch, head) (fp32 [B*H]), is given, and
    needs it."""
    if stages not in STAGES:
        raise ValueError(f"stages {stages} not in {STAGES}")
    bh, padded, d = k_int.shape
    int8 = v_scale is not None
    v_dtype = torch.int8 if int8 else torch.bfloat16
    if tuple(v_t.shape) != (bh, d, padded) or v_t.dtype != v_dtype:
        raise ValueError(f"V^T must be {v_dtype} {(bh, d, padded)}, got {v_t.dtype} "
                         f"{tuple(v_t.shape)}")
    b, n_q, heads, _ = q.shape
    if int8:
        options["pv_int8"] = True
    else:
        options.setdefault("multicast", keys >= MULTICAST_MIN_KEYS)
        options.setdefault("static_max", k_bound is not None)
        options.setdefault("preset_lds", PRESET_LDS)
        if options["static_max"] and (k_bound is None or k_bound.shape != (bh,)
                                      or k_bound.dtype != torch.float32
                                      or k_bound.device != q.device):
            got = None if k_bound is None else (k_bound.dtype, tuple(k_bound.shape),
                                                str(k_bound.device))
            raise ValueError(f"static_max needs the key bounds, fp32 [{bh}] on {q.device}, "
                             f"got {got}")
    kernel = _kernel(q.device.index, stages, int(diag), tuple(sorted(options.items())))
    pair = options.get("multicast", False) and not int8   # a CTA loads half of each K tile
    k_map = cuda_runtime.tensor_map_2d(k_int, bh * padded, d, source.BLOCK_N // (1 + pair), d, 1)
    v_map = (cuda_runtime.tensor_map_2d(v_t, bh * d, padded, d, source.BLOCK_N, 1) if int8 else
             cuda_runtime.tensor_map_2d(v_t, bh * d, padded, d, 64, 2))
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
