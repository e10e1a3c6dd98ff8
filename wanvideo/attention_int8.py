"""The pack's 8-bit attention kernels (forward only) for GPUs with fast INT8 tensor cores and
Triton support, Ada (sm_89) and Hopper (sm_90): the launcher, `supported()`, the launch settings
per device and the hand-over between kernels. The kernels: Triton (attention_int8_kernels, every
such GPU), Gluon (attention_int8_gluon, Hopper) and CUDA compiled by NVRTC (attention_int8_cuda,
Hopper, head dim 128, bf16; the default there).

Numerics, step by step, are those of `attention_8bit.kernel_reference` (the torch reference the
tests compare against, with the reasons for each choice): K smoothed (per-head mean over tokens
removed) and quantized to INT8 per block of `block_n` keys; Q quantized to INT8 per token inside
the kernel; Q.K^T exact in int32; softmax online in fp32 (exp2); P quantized to INT8 per row and
key block, V to INT8 per channel; P.V exact in int32 per key block, accumulated across blocks in
fp32. docs/ATTENTION_8BIT.md explains why P.V is INT8 and not the FP8 the issue first proposed.

Layout: q, k, v [B, L, H, D] as wanvideo/attention.py hands them (any strides with a unit last
stride: the alignment guard's contract). A small Triton pass writes K as [B*H, Lk_pad, D] and V
transposed as [B*H, D, Lk_pad] (keys contiguous: the K-major operand that 8-bit wgmma on Hopper
wants for P.V), both padded with zeros to a multiple of `block_n` so the main loop loads whole
tiles. Triton is imported only when a kernel is first needed.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math

import torch

from .attention_8bit import (INT8_MAX, KERNEL_BLOCK_N, LOG2E, int8_inverse, int8_scale,
                             mean_stride)

log = logging.getLogger(__name__)
# devices where the Gluon default failed to build or launch (device -> error): the Triton kernel
# is their default from then on
_GLUON_FAILED: dict = {}
# the same for the CUDA kernel (attention_int8_cuda): the Gluon kernel takes over there
_CUDA_FAILED: dict = {}

HEAD_DIMS = (64, 128)
# Shorter key sequences stay in SDPA: the text (512) and CLIP (257) cross-attention and the audio
# attention spend little time in attention, and the 8-bit prologue (K mean, V amax, quantization)
# would eat the gain.
MIN_KEYS = 1024
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_ELEMENTS = 2 ** 31 - 1  # in-kernel offsets within one (batch, head) are int32


def device_supported(device: torch.device) -> str | None:
    """None when the kernel can run on `device`, otherwise why not."""
    if device.type != "cuda":
        return f"the 8-bit kernel needs a CUDA device, got {device.type}"
    return _cuda_reason(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_reason(index: int) -> str | None:
    major, minor = _capability_of(index)
    if (major, minor) < (8, 9):
        return f"sm_{major}{minor} has no fast INT8 path for this kernel (needs sm_89+)"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not importable"
    return None


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """None when `attention_int8(q, k, v)` covers these inputs, otherwise the reason (the caller
    falls back to SDPA and logs it)."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        return f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} are not [B, L, H, D]"
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        return f"q {tuple(q.shape)} and k {tuple(k.shape)} differ in batch, heads or head_dim"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head_dim {q.shape[-1]} (the kernel covers {HEAD_DIMS})"
    if k.shape[1] < MIN_KEYS:
        return f"{k.shape[1]} keys (< {MIN_KEYS}: short attention stays in SDPA)"
    if q.shape[1] == 0:
        return "no queries"
    if any(t.dtype not in DTYPES or t.dtype != q.dtype for t in (k, v)) or q.dtype not in DTYPES:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        return "a last stride is not 1 (inputs must pass placement.attention_ready)"
    if k.device != q.device or v.device != q.device:
        return "q, k and v are on different devices"
    if max(q.shape[1], k.shape[1]) * q.shape[2] * q.shape[3] * 3 > _MAX_ELEMENTS:
        return "a sequence too long for int32 offsets"
    return device_supported(q.device)


@functools.lru_cache(maxsize=None)
def _kernels():
    """Compile-on-first-use: the Triton kernels live in a sibling module that imports triton."""
    from . import attention_int8_kernels

    return attention_int8_kernels


PV_CHOICES = ("int8", "bf16")
CONFIG_KEYS = ("pv", "block_m", "block_n", "num_warps", "num_stages", "ws", "lazy", "unroll",
               "tma", "gluon", "cuda")
# The speed-only loop options and their off values (what every config before them ran):
# ws: tl.range(warp_specialize=True) on the key loop (Triton 3.4+); lazy (pv="int8" only): rescale
# the accumulator only when a row max grows by more than 8 in log2 units
# (attention_int8_kernels.LAZY_THRESHOLD; the integers of P are the reference's, only the fp32
# block weights round differently: ~6e-8 rel under the interpreter); unroll: tl.range's
# loop_unroll_factor (1: none); tma (pv="int8" only): K and V^T tiles through device-side tensor
# descriptors (one TMA copy per tile in place of every thread's cp.async and address arithmetic);
# gluon (sm_90 only): attention_int8_gluon's kernels, asynchronous wgmma overlapping the softmax,
# with the numerics of the Triton kernel of the same pv / block_n / lazy (bit for bit on an H200);
# cuda (sm_90, bf16 P.V, head dim 128, bf16 tensors only): attention_int8_cuda's kernel, FA3's
# shape (a producer warp, two consumer warpgroups of 64 query rows), compiled by NVRTC.
# None of them changes an integer of the reference. attention_int8_kernels.unsupported() says
# which the installed Triton cannot build, and that ws does nothing on sm_90 with Triton 3.6 and
# 3.8 (their warp-specialization pass runs for sm_100+ only: identical PTX, checked).
LOOP_DEFAULTS = {"ws": False, "lazy": False, "unroll": 1, "tma": False, "gluon": False,
                 "cuda": False}


def _config(pv, block_m, block_n, num_warps, num_stages, **loop) -> dict:
    return {"pv": pv, "block_m": block_m, "block_n": block_n, "num_warps": num_warps,
            "num_stages": num_stages, **LOOP_DEFAULTS, **loop}


# The launch configurations bench/attention.py times and tests/test_attention_int8.py compiles
# ahead of time for sm_90 with the installed Triton. The first eight are the H200 sweep of record
# (docs/ATTENTION_8BIT.md); the rest wait for their first GPU run: lazy rescaling, TMA loads and
# unrolling on the default and the tutorial's Hopper shapes (128 x 128, 8 warps, 3-4 stages),
# warp specialization last. Appended, so `--configs N` keeps meaning what it meant.
SWEEP = [_config(*c) for c in (
    ("int8", 64, 128, 4, 2), ("int8", 64, 128, 4, 3), ("int8", 128, 128, 8, 2),
    ("int8", 128, 128, 8, 3), ("int8", 128, 64, 8, 3), ("int8", 64, 64, 4, 3),
    ("bf16", 128, 64, 8, 3), ("bf16", 128, 64, 8, 2))] + [
    _config("int8", 64, 128, 4, 3, lazy=True),                      # 8
    # unrolled by 2 the pipeline holds twice the tiles: 64/128/4/3 would need 205 KB (one CTA
    # per SM, which the default relies on being two); 128-row tiles run one CTA per SM anyway
    _config("int8", 128, 128, 8, 2, unroll=2),
    _config("int8", 128, 128, 8, 4),                                # 10: the tutorial's
    _config("int8", 128, 128, 8, 3, lazy=True),
    _config("int8", 64, 128, 4, 3, tma=True),
    _config("int8", 128, 128, 8, 3, tma=True),
    _config("int8", 64, 128, 4, 3, tma=True, lazy=True),
    _config("bf16", 128, 128, 8, 3),                                # 15
    # 16-20, warp-specialized, last: the bench skips them (with the reason) where the installed
    # Triton does not warp-specialize for the GPU (3.6 and 3.8: sm_100+ only)
    _config("int8", 64, 128, 4, 3, ws=True),                        # 16
    _config("int8", 128, 128, 8, 3, ws=True),
    _config("int8", 64, 128, 4, 3, ws=True, tma=True),
    _config("int8", 128, 128, 8, 4, ws=True, tma=True),             # the tutorial's WS shape
    _config("bf16", 128, 128, 8, 3, ws=True),                       # 20
    # 21-28: the Gluon kernels (Hopper only; async wgmma overlapping the softmax, TMA ring).
    # H200: INT8 P.V 2.1x slower than the Triton kernel (its extra int32 P.V tile leaves no
    # registers); bf16 P.V 128/2 (26) the fastest at both lengths and Hopper's default
    # (docs/ATTENTION_8BIT.md, "The Gluon kernels")
    _config("int8", 64, 128, 4, 3, gluon=True),                     # 21
    _config("int8", 64, 128, 4, 3, gluon=True, lazy=True),
    _config("int8", 64, 64, 4, 3, gluon=True),
    _config("int8", 64, 64, 4, 4, gluon=True),
    _config("int8", 64, 64, 4, 3, gluon=True, lazy=True),           # 25
    _config("bf16", 64, 128, 4, 2, gluon=True),                     # 26
    _config("bf16", 64, 64, 4, 3, gluon=True),
    _config("bf16", 64, 64, 4, 4, gluon=True),
    # 29-30: two warpgroups sharing each K/V tile (128-query tiles, one CTA per SM): half the
    # K/V traffic of 64-query tiles, and slower (docs/ATTENTION_8BIT.md, "Two warpgroups")
    _config("bf16", 128, 128, 8, 2, gluon=True),                    # 29
    _config("bf16", 128, 128, 8, 3, gluon=True),
    # 31-32: the CUDA kernel (Hopper, head dim 128, bf16): a producer warp streams K and V^T
    # by TMA, two consumer warpgroups of 64 query rows (12 warps), 3 or 2 ring slots
    _config("bf16", 128, 128, 12, 3, cuda=True),                    # 31
    _config("bf16", 128, 128, 12, 2, cuda=True),
    # 33: the CUDA kernel with INT8 P.V (V^T in the Gluon key order, the int32 product folded
    # per block): half the tensor-core time of bf16 P.V, slower all the same on the H200
    # (32.3 vs 29.2 ms kernel only at 32,760 keys: the fold lengthens the softmax)
    _config("int8", 128, 128, 12, 3, cuda=True),                    # 33
]
# Hopper's default where Triton has Gluon (default_config): SWEEP[26]
HOPPER_GLUON = SWEEP[26]
# Hopper's default for head dim 128 where NVRTC compiles the CUDA kernel: SWEEP[31]
HOPPER_CUDA = SWEEP[31]


def unsupported(config: dict, capability: int | None = None) -> str | None:
    """None when the installed Triton can build `config` (its tl.range and descriptor options)
    and, with `capability` (e.g. 90), the option does something on that GPU; otherwise why not:
    bench/attention.py records the reason and skips the config. Imports triton."""
    if config.get("cuda", False):
        return _cuda_unsupported(config, capability)
    if config.get("gluon", False):
        return _gluon_unsupported(config, capability)
    return _kernels().unsupported(config, capability)


def _gluon_unsupported(config: dict, capability: int | None) -> str | None:
    """Why the Gluon kernel (attention_int8_gluon) cannot run `config`, or None."""
    if capability is not None and capability // 10 != 9:  # wgmma: sm_90 only
        return f"the Gluon kernel is for Hopper (sm_90, wgmma), not sm_{capability}"
    if config["num_warps"] not in (4, 8) or config["block_m"] != 16 * config["num_warps"]:
        return ("the Gluon kernel runs one or two warpgroups (num_warps=4 or 8) of 64 query "
                "rows each (block_m=64 or 128)")
    if config["block_n"] not in (64, 128):
        return "the Gluon kernel takes 64- or 128-key blocks"
    if config.get("ws") or config.get("tma") or config.get("unroll", 1) > 1:
        return "ws / tma / unroll are Triton-kernel options (the Gluon kernel always uses TMA)"
    try:
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError as exc:
        return f"the installed Triton has no Gluon Hopper API ({exc})"
    if config.get("lazy") and config["pv"] != "int8":
        return "lazy rescaling is for pv='int8' only"
    return None


def _cuda_unsupported(config: dict, capability: int | None) -> str | None:
    """Why the CUDA kernel (attention_int8_cuda) cannot run `config`, or None."""
    if capability is not None and capability // 10 != 9:
        return f"the CUDA kernel is for Hopper (sm_90, wgmma), not sm_{capability}"
    shape = (config["block_m"], config["block_n"], config["num_warps"])
    if shape != (128, 128, 12) or config["num_stages"] not in (2, 3):
        return "the CUDA kernel runs 128x128 tiles with 12 warps and 2 or 3 ring slots"
    if config.get("gluon") or any(config.get(k) for k in ("ws", "lazy", "tma")) \
            or config.get("unroll", 1) > 1:
        return "gluon / ws / lazy / tma / unroll are options of the other kernels"
    return _cuda_build_error()


@functools.lru_cache(maxsize=None)
def _cuda_build_error() -> str | None:
    """None when NVRTC compiles the CUDA kernel here, else why not (checked once: ~1 s)."""
    from . import attention_int8_cuda, cuda_runtime

    try:
        attention_int8_cuda.cubin(HOPPER_CUDA["num_stages"])
    except cuda_runtime.CudaRuntimeError as exc:
        return f"NVRTC cannot build the CUDA kernel ({exc})"
    except Exception as exc:  # noqa: BLE001 - a probe: any failure means "not on this machine"
        return f"NVRTC cannot build the CUDA kernel ({type(exc).__name__}: {exc})"
    return None


def default_config(device: torch.device, head_dim: int, cuda: bool = True) -> dict:
    """Launch settings per device. `pv` and `block_n` set the numerics (the reference takes the
    same two); the others only the speed. From the compiler's output (registers, spills,
    instructions per key block) and the H200 benches (docs/ATTENTION_8BIT.md):
    - Hopper with Triton's Gluon (HOPPER_GLUON): the Gluon kernel with bf16 P.V, 64-query tiles,
      2 stages. Against the Triton kernel below in the same H200 runs (K/V pass included):
      33.2-33.6 vs 34.1-34.3 ms at 32,760 keys, 2.21-2.23 vs 2.42-2.50 ms at 8,100, one 3-pass
      window step 7.01 vs 7.23 s, half the error (rel L2 0.012 vs 0.021 against fp32).
    - Hopper with a Triton without Gluon (3.2, for one): the Triton kernel, INT8 P.V, 64-query
      tiles, one warpgroup, 3 stages (254 registers, two CTAs per SM overlap each other's
      tensor-core and softmax phases).
    - Ada and the rest: 128 x 128 tiles, 8 warps (mma.sync; the 64-row tile spills there).
    bench/attention.py sweeps the alternatives. Above all of them on Hopper, for head dim 128:
    the CUDA kernel (HOPPER_CUDA), where NVRTC builds it and it has not failed on the device;
    calls it does not take (other dtypes, unaligned q) run the next kernel of this list
    (`cuda=False`)."""
    if device.type == "cuda" and _capability(device) >= (9, 0):
        hopper = _capability(device)[0] == 9
        if cuda and hopper and head_dim == 128 and device not in _CUDA_FAILED and _cuda_ready():
            return dict(HOPPER_CUDA)
        if hopper and _gluon_ready() and device not in _GLUON_FAILED:
            return dict(HOPPER_GLUON)
        return _config("int8", 64, KERNEL_BLOCK_N, 4, 3)
    return _config("int8", 128, KERNEL_BLOCK_N, 8, 2)


def describe_kernel(device: torch.device, head_dim: int = 128) -> str:
    """The kernel default_config picks on `device`, in words."""
    config = default_config(device, head_dim)
    pv = "INT8" if config["pv"] == "int8" else "bf16"
    kind = "CUDA" if config["cuda"] else "Gluon" if config["gluon"] else "Triton"
    extra = ", two consumer warpgroups; bf16 only" if config["cuda"] else ""
    return (f"the {kind} 8-bit kernel (INT8 Q.K^T, {pv} P.V, "
            f"{config['block_m']}x{config['block_n']} tiles{extra})")


@functools.lru_cache(maxsize=None)
def _gluon_ready() -> bool:
    return _gluon_unsupported(HOPPER_GLUON, 90) is None


def _cuda_ready() -> bool:
    return _cuda_unsupported(HOPPER_CUDA, 90) is None


def _capability(device: torch.device) -> tuple[int, int]:
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _capability_of(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def quantize_kv(k: torch.Tensor, v: torch.Tensor, block_n: int, pv: str = "int8",
                gluon: bool = False, cuda: bool = False):
    """(K int8 [B*H, Lk_pad, D], K scales [B*H, Lk_pad / block_n] fp32, V, V scales): for
    pv="int8" V is INT8 transposed [B*H, D, Lk_pad] with fp32 scales [B*H, D]; for pv="bf16" V is
    the input itself and the scales None. `gluon`: what the Gluon kernels read instead, V^T's
    keys in their operand order (int8) or V as a zero-padded bf16 [B*H, Lk_pad, D] (bf16);
    `cuda` with pv="bf16": V^T as a zero-padded bf16 [B*H, D, Lk_pad], the CUDA kernel's
    operand (V itself where attention_int8_cuda.reads_v takes it), and in place of V's scales
    the largest key norm of each (batch, head), fp32 [B*H]
    (|K int8 row| * its block's scale: with the query's norm it bounds every score,
    attention_int8_cuda_static).
    The K mean (over attention_8bit.mean_stride's subsample) and V's per-channel amax are single
    torch reductions (no temporaries: the fp32 sum reads bf16 directly, aminmax reads V once)."""
    b, keys, h, d = k.shape
    padded = -(-keys // block_n) * block_n
    k_mean = k[:, ::mean_stride(keys)].mean(dim=1, dtype=torch.float32).reshape(b * h, d)
    v_t = v_inv = v_scale = None
    if pv == "bf16" and (gluon or (cuda and not _cuda_reads(v))):
        shape = (b * h, d, padded) if cuda else (b * h, padded, d)
        v_t = torch.empty(shape, dtype=torch.bfloat16, device=k.device)
    if pv == "int8":  # V^T in the Gluon kernels' key order for Gluon and CUDA alike
        gluon = gluon or cuda
        low, high = torch.aminmax(v, dim=1)
        v_amax = torch.maximum(high.float(), -low.float()).reshape(b * h, d)
        v_inv, v_scale = int8_inverse(v_amax).contiguous(), int8_scale(v_amax).contiguous()
        v_t = torch.empty(b * h, d, padded, dtype=torch.int8, device=k.device)
    k_int = torch.empty(b * h, padded, d, dtype=torch.int8, device=k.device)
    k_scale = torch.empty(b * h, padded // block_n, dtype=torch.float32, device=k.device)
    k_norm = torch.empty_like(k_scale) if cuda and pv == "bf16" else None
    with _on(k.device):
        _kernels().quantize_kv(k, v, k_mean, v_inv, k_int, k_scale, v_t, block_n,
                               gluon and pv == "int8", transpose_v=cuda and pv == "bf16",
                               k_norm=k_norm)
    if k_norm is not None:
        v_scale = k_norm.amax(dim=1)
    return k_int, k_scale, (v if v_t is None else v_t), v_scale


def _cuda_reads(v: torch.Tensor) -> bool:
    from . import attention_int8_cuda

    return attention_int8_cuda.reads_v(v)


def quantize_for(k: torch.Tensor, v: torch.Tensor, config: dict):
    """quantize_kv's output in the layout the kernel of `config` reads."""
    return quantize_kv(k, v, config["block_n"], config["pv"], config["gluon"], config["cuda"])


def launch_config(q: torch.Tensor, **overrides) -> dict:
    """default_config for q's device and head dim, with the non-None `overrides` applied.
    Overrides (other than cuda=True) start from the default below the CUDA kernel, whose
    settings are its own; without overrides the CUDA kernel is the default only for the calls
    it takes (bf16, 16-byte aligned q)."""
    given = {name: value for name, value in overrides.items() if value is not None}
    unknown = set(overrides) - set(CONFIG_KEYS)
    if unknown:
        raise TypeError(f"unknown launch settings {sorted(unknown)}")
    if given.get("cuda"):
        config = dict(HOPPER_CUDA)
    else:
        config = default_config(q.device, q.shape[-1], cuda=not given and _cuda_takes(q))
    config.update(given)
    if config["pv"] not in PV_CHOICES:
        raise ValueError(f"pv {config['pv']!r} is not one of {PV_CHOICES}")
    if int(config["unroll"]) < 1:
        raise ValueError(f"unroll {config['unroll']!r} must be >= 1")
    return config


def _on(device: torch.device):
    """Triton launches on the current device; CPU tensors only get here under TRITON_INTERPRET."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def softmax_factor(head_dim: int) -> float:
    """What turns an exact INT8 score times the query's and key block's amax into the
    softmax's log2 domain: log2(e) / (sqrt(head_dim) * 127)."""
    return LOG2E / (math.sqrt(head_dim) * INT8_MAX)


def attend_quantized(q: torch.Tensor, kv: tuple, keys: int, config: dict,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """The attention kernel alone on quantize_kv's output for `keys` real keys, written into
    `out` (q's shape and dtype) when given."""
    k_int, k_scale, v, v_scale = kv
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device) if out is None else out
    factor = softmax_factor(q.shape[-1])
    if config.get("cuda"):
        from . import attention_int8_cuda

        reason = attention_int8_cuda.unsupported(q, out)
        if reason:
            raise ValueError(reason)
        # the fourth part of kv: V's scales for INT8 P.V, the key norms for bf16
        int8 = config["pv"] == "int8"
        _LAST_LAUNCH[0] = attention_int8_cuda.attention(
            q, k_int, k_scale, v, out, keys, factor, config["num_stages"],
            v_scale=v_scale if int8 else None, k_bound=None if int8 else v_scale)
        return out
    kernels = _gluon_kernels() if config.get("gluon") else _kernels()
    with _on(q.device):
        _LAST_LAUNCH[0] = kernels.attention(q, k_int, k_scale, v,
                                            v_scale if v_scale is not None else k_scale, out,
                                            keys, factor,
                                            **{name: value for name, value in config.items()
                                               if name != "cuda"})
    return out


_LAST_LAUNCH = [None]   # the compiled kernel of the latest attend_quantized


def launch_facts() -> dict:
    """n_regs, n_spills and shared memory of the latest launch (bench/attention.py records them
    next to each timing)."""
    facts = getattr(_LAST_LAUNCH[0], "facts", None)
    return facts() if facts is not None else _kernels().launch_facts(_LAST_LAUNCH[0])


@functools.lru_cache(maxsize=None)
def _gluon_kernels():
    """The Hopper kernel written in Gluon (config gluon=True), imported on first use."""
    from . import attention_int8_gluon

    return attention_int8_gluon


def attention_int8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **overrides) -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D] in q's dtype, softmax scale 1/sqrt(D).
    Call `supported` first: this function assumes it returned None. `overrides`: CONFIG_KEYS
    (bench/attention.py's sweep). Should the CUDA or Gluon default fail to build or launch (a
    driver, NVRTC or Triton it does not support), the next kernel of default_config's list takes
    over on that device with one warning; explicit overrides get the error. Calls the CUDA
    kernel does not take (fp16 / fp32, unaligned q) run the Gluon or Triton default."""
    config = launch_config(q, **overrides)
    if overrides or not (config["gluon"] or config["cuda"]):
        return _launch(q, k, v, config)
    try:
        return _launch(q, k, v, config)
    except torch.cuda.OutOfMemoryError:
        raise   # the next kernel would need the memory too
    except Exception as e:  # noqa: BLE001 - any build or launch failure of the kernel
        failed, name = (_CUDA_FAILED, "CUDA") if config["cuda"] else (_GLUON_FAILED, "Gluon")
        failed[q.device] = f"{type(e).__name__}: {e}"
        log.warning("8-bit attention: the %s kernel failed on %s (%s); %s runs there from now "
                    "on", name, q.device, failed[q.device], describe_kernel(q.device, q.shape[-1]))
        return attention_int8(q, k, v)


def _cuda_takes(q: torch.Tensor) -> bool:
    """Whether the CUDA kernel could take q (device, dtype, head dim, alignment)."""
    if q.device.type != "cuda":
        return False
    from . import attention_int8_cuda

    return attention_int8_cuda.unsupported(q) is None


def _launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict) -> torch.Tensor:
    return attend_quantized(q, quantize_for(k, v, config), k.shape[1], config)
