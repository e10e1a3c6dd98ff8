"""The one module that changes where model tensors live, and the layout invariant that guards them.

Invariant: every tensor a kernel reads on the compute device is contiguous and its data pointer is
16-byte aligned. Misaligned or strided weights are what make fused attention and `_scaled_mm` crash
("misaligned address", CUBLAS_STATUS_NOT_SUPPORTED) or, with cuDNN attention, return wrong numbers.

Rules kept here so no other code needs to know them:
- a move always lands in fresh (or pre-allocated, aligned) storage: `.to()` may keep a view or its
  strides, `.contiguous()` keeps a misaligned pointer, a view of a mapped safetensors file is only
  8-byte aligned;
- parameters are replaced, never re-pointed through `param.data`, so no module keeps a stale alias;
- `check_layout` names every parameter, buffer or plain tensor attribute that breaks the rule.

Set WANVIDEO_CHECK_LAYOUT=1 to run the checker after every move in production (it raises
LayoutError naming the offending tensors).
"""
from __future__ import annotations

import os
from typing import Iterable, Mapping

import torch
from torch import nn

ALIGNMENT = 16
# Sub-buffers handed out by pack_flat start on this boundary; matches fresh CUDA allocations.
PACK_ALIGNMENT = 256
CHECK_ENV = "WANVIDEO_CHECK_LAYOUT"


class LayoutError(RuntimeError):
    """A tensor that a kernel will read is not contiguous or not 16-byte aligned."""


def checking_enabled() -> bool:
    return os.environ.get(CHECK_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def is_ready(t: torch.Tensor) -> bool:
    """True when `t` meets the invariant (meta and empty tensors trivially do)."""
    if t.device.type == "meta" or t.numel() == 0:
        return True
    return t.is_contiguous() and t.data_ptr() % ALIGNMENT == 0


def _resolve(dtype: torch.dtype | None, src: torch.Tensor) -> torch.dtype:
    return src.dtype if dtype is None else dtype


def fresh_copy(src: torch.Tensor, device=None, dtype: torch.dtype | None = None,
               pin: bool = False) -> torch.Tensor:
    """A new contiguous allocation holding `src` (cast to `dtype`); never a view of `src`."""
    device = src.device if device is None else torch.device(device)
    out = torch.empty(tuple(src.shape), dtype=_resolve(dtype, src), device=device,
                      pin_memory=pin and device.type == "cpu")
    if src.device.type != "meta":
        out.copy_(src, non_blocking=pin)
    return out


def kernel_ready(t: torch.Tensor) -> torch.Tensor:
    """The alignment guard for kernel inputs: returns `t` itself when it already qualifies,
    otherwise an aligned contiguous copy. Cheap enough to stay on (two attribute reads)."""
    if t.is_contiguous() and (t.numel() == 0 or t.data_ptr() % ALIGNMENT == 0):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def attention_ready(t: torch.Tensor) -> torch.Tensor:
    """The guard for fused attention kernels (flash, efficient, cuDNN, sage): they accept strided
    views such as [B,L,H,D] -> [B,H,L,D] but need a 16-byte aligned pointer, a unit last stride and
    every other stride a multiple of 16 bytes. Copies only when that fails."""
    if t.numel() == 0:
        return t
    size = t.element_size()
    if (t.data_ptr() % ALIGNMENT == 0 and t.stride(-1) == 1
            and all((s * size) % ALIGNMENT == 0 for s in t.stride()[:-1])):
        return t
    return t.clone(memory_format=torch.contiguous_format)


def owner_of(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    """Dotted `name` -> (the submodule that holds it, its attribute name there)."""
    owner, _, leaf = name.rpartition(".")
    return (module.get_submodule(owner) if owner else module), leaf


def set_tensor(module: nn.Module, name: str, value: torch.Tensor, device=None,
               dtype: torch.dtype | None = None) -> torch.Tensor:
    """Replace parameter or buffer `name` (dotted) with a fresh copy of `value`."""
    owner, leaf = owner_of(module, name)
    new = fresh_copy(value, device=device, dtype=dtype)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(new, requires_grad=False)
    elif leaf in owner._buffers:
        owner._buffers[leaf] = new
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer named {name!r}")
    return new


def adopt_tensor(module: nn.Module, name: str, storage: torch.Tensor) -> None:
    """Point parameter or buffer `name` at `storage` without copying. Used by BlockSwap to map a
    block onto a pre-allocated device slot; `storage` must already meet the invariant. A
    parameter given as an nn.Parameter is adopted as that very object (BlockSwap prepares its
    host-master parameters once instead of wrapping them again after every block)."""
    if not is_ready(storage):
        raise LayoutError(f"refusing to adopt misaligned or strided storage for {name!r} "
                          f"(ptr % {ALIGNMENT} = {storage.data_ptr() % ALIGNMENT}, "
                          f"contiguous={storage.is_contiguous()})")
    owner, leaf = owner_of(module, name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = (storage if isinstance(storage, nn.Parameter)
                                   else nn.Parameter(storage, requires_grad=False))
    elif leaf in owner._buffers:
        owner._buffers[leaf] = storage
    else:
        raise KeyError(f"{type(module).__name__} has no parameter or buffer named {name!r}")


def named_tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    yield from module.named_parameters(recurse=True)
    yield from module.named_buffers(recurse=True)


def _tensor(module: nn.Module, name: str) -> torch.Tensor:
    """Parameter or buffer `name` (dotted) as the module holds it now."""
    owner, leaf = owner_of(module, name)
    return owner._parameters[leaf] if leaf in owner._parameters else owner._buffers[leaf]


def materialize(module: nn.Module, state_dict: Mapping[str, torch.Tensor], device,
                dtype_for=None, where: str = "state dict", defer: Iterable[str] = ()) -> None:
    """Fill every parameter/buffer of a (meta-constructed) module from `state_dict`, each in fresh
    storage on `device`. `dtype_for(name, tensor)` picks the stored dtype (None keeps the source's).
    Buffers absent from the state dict (non-persistent caches) move to `device` as they are.
    Names in `defer` must be in `state_dict` but are not read: they stay on meta for a caller that
    turns them into something else one at a time (quantizing while loading), so a whole model
    never sits in memory in full precision. Tensors absent from the state dict that already sit
    on `device` and meet the invariant are kept as they are (a pre-quantized file's layers)."""
    defer = set(defer)
    persistent = set(module.state_dict(keep_vars=True).keys())
    missing = [n for n, _ in named_tensors(module) if n in persistent and n not in state_dict]
    if missing:
        raise KeyError(f"{where}: missing {len(missing)} key(s), e.g. {missing[:3]}")
    device = torch.device(device)
    # Names, not tensors: a list of the tensors would keep every replaced one alive until the
    # loop ends. It did, and copying a 14B fp8 file's layers (non-persistent buffers already in
    # place) held 16 GB of originals next to their copies: a 14 GB spike in the server's RSS.
    for name in [n for n, _ in named_tensors(module)]:
        if name in defer:
            continue
        current = _tensor(module, name)
        if name not in state_dict:
            in_place = current.device == device and is_ready(current)
            if current.device.type != "meta" and not in_place:
                set_tensor(module, name, current, device=device)
            continue
        src = state_dict[name]
        if tuple(src.shape) != tuple(current.shape):
            raise ValueError(f"{where}: key {name!r} has shape {tuple(src.shape)}, "
                             f"expected {tuple(current.shape)}")
        dtype = dtype_for(name, src) if dtype_for is not None else None
        set_tensor(module, name, src, device=device, dtype=dtype)
    verify(module, f"materialize from {where}")


def move_module(module: nn.Module, device, dtype: torch.dtype | None = None) -> nn.Module:
    """Move every parameter and buffer into fresh storage on `device`. `dtype` casts floating
    parameters only: buffers (RoPE tables, scales) keep the precision their owner chose."""
    params = {n for n, _ in module.named_parameters()}
    for name in [n for n, _ in named_tensors(module)]:  # names: see materialize
        t = _tensor(module, name)
        cast = dtype if (dtype is not None and name in params and t.is_floating_point()) else None
        set_tensor(module, name, t, device=device, dtype=cast)
    verify(module, f"move to {device}")
    return module


def attach_module(parent: nn.Module, name: str, child: nn.Module,
                  state_dict: Mapping[str, torch.Tensor] | None, device, dtype_for=None,
                  where: str = "state dict", defer: Iterable[str] = ()) -> nn.Module:
    """Register `child` (usually meta-built) as `parent.<name>` and materialize it. Registering as a
    submodule is what makes it visible to parameters(), state_dict() and BlockSwap. `defer`: as in
    materialize (names relative to `child`)."""
    if state_dict is None:
        move_module(child, device)
    else:
        materialize(child, state_dict, device, dtype_for=dtype_for, where=where, defer=defer)
    setattr(parent, name, child)
    verify(parent, f"attach {name}")
    return child


def pack_flat(tensors: list[torch.Tensor], device, pin: bool = False,
              dtype: torch.dtype = torch.uint8) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Allocate one flat byte buffer holding every tensor at a PACK_ALIGNMENT boundary; returns the
    buffer and (offset, nbytes) per tensor. Copies the data in. Used for BlockSwap host masters."""
    spans, cursor = [], 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        spans.append((cursor, nbytes))
        cursor += -(-nbytes // PACK_ALIGNMENT) * PACK_ALIGNMENT
    device = torch.device(device)
    flat = torch.empty(max(cursor, PACK_ALIGNMENT), dtype=dtype, device=device,
                       pin_memory=pin and device.type == "cpu")
    for t, (off, nbytes) in zip(tensors, spans):
        if nbytes:
            view = flat[off:off + nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)
    return flat, spans


def view_in(flat: torch.Tensor, offset: int, like: torch.Tensor) -> torch.Tensor:
    """The sub-view of a pack_flat buffer shaped like `like` (aligned by construction)."""
    nbytes = like.numel() * like.element_size()
    return flat[offset:offset + nbytes].view(like.dtype).view(like.shape)


def empty_flat(nbytes: int, device) -> torch.Tensor:
    """An uninitialised flat byte buffer of at least `nbytes`, rounded up to PACK_ALIGNMENT (so
    any dtype can view it) and as aligned as every fresh allocation: the device buffers that
    BlockSwap copies pack_flat buffers into."""
    size = max(-(-nbytes // PACK_ALIGNMENT) * PACK_ALIGNMENT, PACK_ALIGNMENT)
    return torch.empty(size, dtype=torch.uint8, device=torch.device(device))


def copy_bytes(dst: torch.Tensor, src: torch.Tensor, overlap: bool = False) -> None:
    """Copy the flat byte buffer `src` (a pack_flat buffer, or its used prefix) into the start of
    flat buffer `dst`, usually host to device. `overlap`: queue it asynchronously on the current
    stream (pinned source); the caller orders readers and reuse with events."""
    dst[:src.numel()].copy_(src, non_blocking=overlap)


def plain_tensor_attributes(module: nn.Module) -> list[str]:
    """Tensors stored as plain attributes: invisible to .to(), parameters() and this checker's
    other rules, so they are themselves a violation."""
    found = []
    for mod_name, mod in module.named_modules():
        for attr, value in vars(mod).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
                found.append(f"{mod_name + '.' if mod_name else ''}{attr}")
    return found


def check_layout(module: nn.Module) -> list[str]:
    """Names of every parameter, buffer or plain tensor attribute breaking the invariant."""
    bad = []
    for name, t in named_tensors(module):
        if not is_ready(t):
            why = "non-contiguous" if not t.is_contiguous() else f"ptr%16={t.data_ptr() % ALIGNMENT}"
            bad.append(f"{name} ({why})")
    bad.extend(f"{n} (plain tensor attribute)" for n in plain_tensor_attributes(module))
    return bad


def verify(module: nn.Module, where: str, force: bool = False) -> None:
    """Run the checker when WANVIDEO_CHECK_LAYOUT is on (or `force`); raise naming violations."""
    if not (force or checking_enabled()):
        return
    bad = check_layout(module)
    if bad:
        raise LayoutError(f"layout invariant broken after {where}: {', '.join(bad[:10])}"
                          + (f" (+{len(bad) - 10} more)" if len(bad) > 10 else ""))
