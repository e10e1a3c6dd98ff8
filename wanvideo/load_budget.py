"""How much memory a checkpoint will take once loaded, checked before the first weight is read,
so a model that cannot fit fails with "needs about X GB, Y GB available" rather than the
operating system killing the ComfyUI server halfway through a 28 GB read."""
from __future__ import annotations

import torch

from .checkpoint import Checkpoint
from .memory import require_device, require_host

FP32_SUFFIXES = ("modulation",)          # kept in fp32 whatever the base dtype (loader policy)
QUANTIZED_BYTES = {"fp8_e4m3fn": 1.0, "fp8_e4m3fn_scaled": 1.0, "nvfp4": 0.5625}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def loaded_bytes(ckpt: Checkpoint, base_dtype: torch.dtype, quantization: str = "none") -> int:
    """Bytes of the loaded model: stored-quantized tensors as they are, block matrices at the
    quantized width when quantizing on load, everything else at the base dtype (fp32 for the
    modulation tensors)."""
    base = torch.empty((), dtype=base_dtype).element_size()
    per_weight = QUANTIZED_BYTES.get(quantization)
    total = 0.0
    for key, info in ckpt.tensors.items():
        n = _numel(info.shape)
        if info.dtype.itemsize == 1 and info.dtype.is_floating_point:   # fp8 as stored
            total += info.nbytes
        elif per_weight and len(info.shape) == 2 and key.startswith("blocks."):
            total += n * per_weight
        elif not info.dtype.is_floating_point:
            total += info.nbytes
        else:
            total += n * (4 if key.endswith(FP32_SUFFIXES) else base)
    return int(total)


def require_room(ckpt: Checkpoint, device, base_dtype: torch.dtype, quantization: str) -> int:
    """Refuse a load that cannot fit where the weights go; returns the estimate."""
    need = loaded_bytes(ckpt, base_dtype, quantization)
    what = f"loading {ckpt.name} in {str(base_dtype).replace('torch.', '')}" + \
        (f" quantized to {quantization}" if quantization != "none" else "")
    if torch.device(device).type == "cuda":
        require_device(need, device, what, "load to the offload device (host RAM) and stream "
                       "blocks with WanVideo BlockSwap, or use an fp8 checkpoint")
    else:
        require_host(need, what, "use the fp8 checkpoint or quantization fp8_e4m3fn_scaled "
                     "(half the size), or close other programs")
    return need
