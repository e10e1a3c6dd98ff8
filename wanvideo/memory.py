"""Memory budgets checked before large allocations, so an impossible request fails with
"needs about X GB, Y GB available" instead of an allocator error deep inside a kernel (or the
operating system killing the server)."""
from __future__ import annotations

import os

import torch

GB = 1e9


class MemoryBudgetError(ValueError):
    """A request that cannot fit; the message names what needs the memory and how much."""


# A cap on the host figure (bytes), to rehearse a small machine (tests, support cases).
HOST_LIMIT_ENV = "WANVIDEO_HOST_RAM_LIMIT"


def host_available_bytes() -> int | None:
    """Memory the OS can still give this process (MemAvailable, capped by $WANVIDEO_HOST_RAM_LIMIT
    when set), None when unknown."""
    real = _os_available_bytes()
    cap = os.environ.get(HOST_LIMIT_ENV, "")
    if cap.isdigit():
        return int(cap) if real is None else min(real, int(cap))
    return real


def _os_available_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _memory_fraction(device: torch.device) -> float:
    """PyTorch's per-process cap (torch.cuda.set_per_process_memory_fraction): the allocator
    refuses to reserve beyond fraction x total, so every budget must see the capped card. The
    getter exists from torch 2.5; older versions report no cap."""
    getter = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    device = torch.device(device)
    # the getter refuses a bare "cuda" (no index); the allocator means the current device then
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        return float(getter(index)) if getter is not None else 1.0
    except (RuntimeError, TypeError):
        return 1.0


def device_available_bytes(device) -> int | None:
    """Free memory of a CUDA device plus what PyTorch's allocator holds in reserve but does not
    use (it reuses that first), never more than the per-process cap leaves; None for the CPU
    (see host_available_bytes)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    cached = torch.cuda.memory_reserved(device) - allocated
    capped = int(_memory_fraction(device) * total) - allocated
    return max(0, min(int(free + max(0, cached)), capped))


def device_total_bytes(device) -> int | None:
    """A CUDA device's whole memory as this process may use it (the per-process cap applied):
    what is left once every other model is unloaded and every block swapped; None for the CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    total = int(torch.cuda.get_device_properties(device).total_memory)
    return int(_memory_fraction(device) * total)


def require(nbytes: int, available: int | None, what: str, hint: str = "") -> None:
    """Raise MemoryBudgetError when `nbytes` exceeds `available` (unknown availability passes)."""
    if available is None or nbytes <= available:
        return
    raise MemoryBudgetError(f"{what} needs about {nbytes / GB:.1f} GB, {available / GB:.1f} GB "
                            f"available{'; ' + hint if hint else ''}")


def require_host(nbytes: int, what: str, hint: str = "") -> None:
    require(nbytes, host_available_bytes(), f"{what} (host RAM)", hint)


def require_device(nbytes: int, device, what: str, hint: str = "", whole: bool = False) -> None:
    """On the CPU the host budget applies; on CUDA the device's free memory, or its total
    memory with `whole` (for work that runs after other models were unloaded)."""
    if torch.device(device).type == "cuda":
        have = device_total_bytes(device) if whole else device_available_bytes(device)
        require(nbytes, have, f"{what} (GPU memory)", hint)
    else:
        require_host(nbytes, what, hint)



# glibc's M_MMAP_THRESHOLD (malloc.h): allocations at least this large get their own mapping.
_M_MMAP_THRESHOLD = -3
_OWN_MAPPING_BYTES = 1 << 20


def _glibc():
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:  # musl and other C libraries: their own policies apply
        return None


def return_freed_host_memory() -> None:
    """Make every host allocation of 1 MiB or more a mapping of its own, unmapped when freed.

    glibc serves blocks below its *dynamic* mmap threshold (which climbs to 32 MiB after the first
    large free) from the heap, and a heap keeps freed blocks it cannot trim from its top. Loading
    reads, merges and requantizes hundreds of 10-70 MB weights and packs them again for BlockSwap;
    each replaced tensor left such a hole, and the server's RSS ended near twice the model (14B fp8
    + LoRA: 37.7 GB kept for a 21.7 GB model, 60 GB once BlockSwap had packed it). With a fixed
    1 MiB threshold the freed bytes go back to the OS at once. Process-wide and idempotent; a
    no-op off glibc."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(_M_MMAP_THRESHOLD, _OWN_MAPPING_BYTES)


def trim_host_memory() -> None:
    """Give the heap's free pages back to the OS (after a load or a re-pack)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
