"""The one attention function of the pack. Every backend gets its inputs through the alignment
guard, because flash/efficient kernels crash on misaligned pointers and cuDNN silently returns
wrong numbers (docs/REFERENCE_NOTES.md §6).

Backends: "sdpa" (PyTorch), "int8" (the pack's 8-bit Triton kernel, wanvideo/attention_int8.py),
"auto" (int8 where it is the faster choice, else sdpa), "flash_attn" and "sageattention" (their
packages). int8 and auto fall back to SDPA call by call for whatever the kernel does not cover:
short key sequences (the text and CLIP cross-attention; InfiniteTalk's audio attention calls SDPA
itself), other head dims, devices below sm_89 and the CPU. Shape fallbacks log at debug level;
an explicit "int8" on a device that cannot run it warns once per device.

`attention_lse` and `merge_partial` serve the opt-in key exchange of sequence parallelism (SDPA
over part of the keys with its log-sum-exp, and the exact merge of two such parts)."""
from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

from .fused_ops import enabled
from .placement import attention_ready

BACKENDS = ("auto", "sdpa", "int8", "flash_attn", "sageattention")
# Where `auto` picks the 8-bit kernel: compute capability -> the fewest keys at which
# bench/attention.py measured it faster than cuDNN SDPA. H200 with the Hopper default (the CUDA
# kernel, bench/results/attention_h200_twelfth_gpu_lead.json): 23.7 vs 36.5 ms at 32,760 keys
# (1.54x), 1.59 vs 2.23 ms at 8,100 (1.41x; not yet checked end to end, so 8,100 keys stay in
# SDPA). The Gluon kernel: 1.10-1.13x and 0.99-1.07x; the Triton kernel: 1.08-1.09x
# and 0.89-0.90x. Ada and Blackwell have not been measured: SDPA there.
AUTO_INT8_MIN_KEYS = {(9, 0): 16384}

log = logging.getLogger(__name__)
# devices where `auto` saw the 8-bit kernel fail (device -> error): SDPA there from then on
_INT8_FAILED: dict = {}


def available_backends() -> list[str]:
    found = ["auto", "sdpa"]
    if importlib.util.find_spec("triton") is not None:
        found.append("int8")
    if importlib.util.find_spec("flash_attn") is not None:
        found.append("flash_attn")
    if importlib.util.find_spec("sageattention") is not None:
        found.append("sageattention")
    return found


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r} is unknown; expected one of {BACKENDS}")
    if name not in available_backends():
        raise ValueError(f"attention backend {name!r} was requested but its package is not "
                         f"importable here; available: {available_backends()}")
    return name


@functools.lru_cache(maxsize=None)
def auto_min_keys(device: torch.device) -> int | None:
    """The key count from which `auto` runs the 8-bit kernel on `device`; None: never (SDPA)."""
    from . import attention_int8

    if device.type != "cuda" or attention_int8.device_supported(device) is not None:
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return AUTO_INT8_MIN_KEYS.get(tuple(torch.cuda.get_device_capability(index)))


def auto_choice(device: torch.device, keys: int) -> str:
    """What `auto` runs for `keys` keys on `device`: "int8" where it was measured faster."""
    least = auto_min_keys(device)
    return "int8" if least is not None and keys >= least else "sdpa"


def describe_backend(name: str, device: torch.device) -> str:
    """What backend `name` runs for the model's self-attention on `device`, in words (the model
    loader logs it next to what it detected)."""
    if name not in ("int8", "auto"):
        return "PyTorch SDPA" if name == "sdpa" else f"the {name} package"
    from . import attention_int8

    reason = attention_int8.device_supported(device)
    if reason is not None:
        return f"PyTorch SDPA ({reason})"
    kernel = attention_int8.describe_kernel(device)
    if name == "int8":
        return f"{kernel}; PyTorch SDPA for the calls it does not cover"
    least = auto_min_keys(device)
    if least is None:
        return "PyTorch SDPA (the 8-bit kernel was not measured faster on this GPU)"
    return f"{kernel} from {least:,} keys, PyTorch SDPA below"


def sdpa_for(backend: str, device: torch.device, keys: int) -> bool:
    """Whether `attention(..., backend)` over `keys` keys on `device` runs PyTorch SDPA."""
    if backend == "auto":
        return device in _INT8_FAILED or auto_choice(device, keys) == "sdpa"
    return backend == "sdpa"


@functools.lru_cache(maxsize=256)  # bounded: debug reasons name shapes
def _say_once(level: int, message: str) -> None:
    log.log(level, message)


def _int8_or_reason(q, k, v, backend: str) -> str | None:
    """None when the 8-bit kernel runs these inputs, else why SDPA runs them instead."""
    from . import attention_int8

    if backend == "auto" and auto_choice(q.device, k.shape[1]) != "int8":
        return "auto picks sdpa for this device and length"
    device_reason = attention_int8.device_supported(q.device)
    if device_reason is not None:
        _say_once(logging.WARNING, f"attention 'int8' runs SDPA on {q.device}: {device_reason}")
        return device_reason
    return attention_int8.supported(q, k, v)


def _int8(q, k, v, backend: str) -> torch.Tensor:
    """The 8-bit kernel. Under `auto` a kernel that cannot be built or run here (a Triton or
    driver that does not compile it) must not end the user's run: SDPA takes over for this device
    from then on, with one warning naming the error. An explicit "int8" raises it."""
    from . import attention_int8

    if backend == "int8":
        return attention_int8.attention_int8(q, k, v)
    if q.device in _INT8_FAILED:
        return _sdpa(q, k, v)
    try:
        return attention_int8.attention_int8(q, k, v)
    except torch.cuda.OutOfMemoryError:
        raise   # SDPA would need the memory too; the caller's budget logic handles this
    except Exception as e:  # noqa: BLE001 - any build or launch failure of the optional kernel
        _INT8_FAILED[q.device] = f"{type(e).__name__}: {e}"
        log.warning("attention 'auto': the 8-bit kernel failed on %s (%s); SDPA runs there from "
                    "now on", q.device, _INT8_FAILED[q.device])
        return _sdpa(q, k, v)


def _sdpa(q, k, v) -> torch.Tensor:
    q, k, v = (attention_ready(t.transpose(1, 2)) for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """SDPA that also returns the log-sum-exp of each query's scaled scores (natural log), so
    that attention over key blocks computed apart can be merged exactly (merge_partial):
    q [B, Lq, H, D], k/v [B, Lk, H, D] -> (out [B, Lq, H, D], lse [B, H, Lq] fp32).
    CUDA: cuDNN's SDPA kernel for fp16/bf16 (the one F.scaled_dot_product_attention picks on
    Hopper; torch 2.5+ signature), else the memory-efficient kernel; elsewhere the fp32 math."""
    b, lq, h, _ = q.shape
    qt, kt, vt = (attention_ready(t.transpose(1, 2)) for t in (q, k, v))
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
                qt, kt, vt, None, True, 0.0, False, False)[:2]
        except (RuntimeError, TypeError):   # older signature / cuDNN refuses this shape
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
                qt, kt, vt, None, True)[:2]
    elif q.is_cuda:   # cuDNN returned NaN for fp32 on an H200 instead of refusing it
        out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(
            qt, kt, vt, None, True)[:2]
    else:
        scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.matmul(torch.exp(scores - lse[..., None]), vt.float()).to(q.dtype)
    # cuDNN gives [B, H, Lq, 1], the efficient kernel pads Lq to a multiple of 32
    return out.transpose(1, 2), lse.reshape(b, h, -1)[:, :, :lq].float()


def merge_partial(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                  lse_b: torch.Tensor):
    """Attention over the keys of A and B together from the two parts (attention_lse's outputs):
    the softmax weights of A's keys sum to sigmoid(lse_a - lse_b) of the whole. fp32 math and one
    rounding to out_a's dtype; on CUDA one Triton pass (attention_merge_kernels)."""
    d = out_a.shape[-1]
    if (enabled(out_a) and d in (32, 64, 128, 256) and out_a.stride(-1) == 1
            and out_b.stride(-1) == 1 and out_b.dtype == out_a.dtype):
        return _merge_triton(out_a, lse_a, out_b, lse_b)
    w = torch.sigmoid(lse_a - lse_b).transpose(1, 2).unsqueeze(-1)
    out = torch.lerp(out_b.float(), out_a.float(), w).to(out_a.dtype)
    return out, torch.logaddexp(lse_a, lse_b)


def _merge_triton(out_a, lse_a, out_b, lse_b):
    from . import attention_merge_kernels   # imports triton

    b, lq, h, d = out_a.shape
    out = torch.empty(b, lq, h, d, dtype=out_a.dtype, device=out_a.device)
    lse = torch.empty(b, h, lq, dtype=torch.float32, device=out_a.device)
    attention_merge_kernels.merge[(b * lq,)](
        out_a, out_b, lse_a, lse_b, out, lse, lq, h,
        out_a.stride(0), out_a.stride(1), out_a.stride(2),
        out_b.stride(0), out_b.stride(1), out_b.stride(2),
        *lse_a.stride(), *lse_b.stride(), D=d, BLOCK_H=max(16, 1 << (h - 1).bit_length()),
        num_warps=4)
    return out, lse


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]; softmax scale 1/sqrt(D)."""
    if backend == "sdpa":
        return _sdpa(q, k, v)
    if backend in ("int8", "auto"):
        q, k, v = (attention_ready(t) for t in (q, k, v))
        reason = _int8_or_reason(q, k, v, backend)
        if reason is None:
            return _int8(q, k, v, backend)
        if log.isEnabledFor(logging.DEBUG):
            _say_once(logging.DEBUG, f"attention {backend!r} -> SDPA: {reason}")
        return _sdpa(q, k, v)
    dtype = q.dtype
    half = torch.bfloat16 if dtype not in (torch.float16, torch.bfloat16) else dtype
    q, k, v = (attention_ready(t.to(half)) for t in (q, k, v))
    if backend == "flash_attn":
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v).to(dtype)
    if backend == "sageattention":
        from sageattention import sageattn

        return sageattn(q, k, v, tensor_layout="NHD").to(dtype)
    raise ValueError(f"attention backend {backend!r} is unknown; expected one of {BACKENDS}")
