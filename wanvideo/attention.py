"""The one attention function of the pack. Every backend gets its inputs through the alignment
guard, because flash/efficient kernels crash on misaligned pointers and cuDNN silently returns
wrong numbers (docs/REFERENCE_NOTES.md §6)."""
from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

from .placement import attention_ready

BACKENDS = ("sdpa", "flash_attn", "sageattention")


def available_backends() -> list[str]:
    found = ["sdpa"]
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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]; softmax scale 1/sqrt(D)."""
    if backend == "sdpa":
        q, k, v = (attention_ready(t.transpose(1, 2)) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
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
