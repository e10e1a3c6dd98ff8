"""BlockSwap data: host masters and the device buffers their bytes are copied into
(docs/ARCHITECTURE.md §5).

A *group* is one transformer block, or every non-block tensor of the model. Its parameters and
buffers (bf16 weights, InfiniteTalk layers, fp8 weights and their scales alike) are packed once
into one flat host buffer, its *host master* (`placement.pack_flat`: each tensor on a 256-byte
boundary; pinned when streaming to CUDA). Between forwards the group's tensors ARE views of that
buffer, so the model is always consistent (`state_dict()` works) and never points at a freed
device buffer. Weights do not change while sampling, so nothing is ever copied back.

Streaming a group = one byte copy of its master into a `DeviceSlots` buffer, then re-pointing each
tensor at the same offset inside that buffer; afterwards it is re-pointed at its host master.
The copies and re-pointings go through `placement`. *When* they happen is swap_stream.py; *how
many* blocks are groups is swap_sizing.py.
"""
from __future__ import annotations

import torch
from torch import nn

from . import placement


def module_tensors(module: nn.Module, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every (dotted name, tensor) of `module`'s parameters and buffers, shared ones under each
    name (so re-pointing reaches every owner)."""
    out = list(module.named_parameters(prefix=prefix, remove_duplicate=False))
    out += module.named_buffers(prefix=prefix, remove_duplicate=False)
    return out


def non_block_tensors(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The model's tensors outside `model.blocks`: embeddings, head, img_emb, audio_proj, RoPE."""
    out = [(n, t) for n, t in model._parameters.items() if t is not None]
    out += [(n, t) for n, t in model._buffers.items() if t is not None]
    for name, child in model.named_children():
        if name != "blocks":
            out += module_tensors(child, name)
    return out


def unique_bytes(named: list[tuple[str, torch.Tensor]]) -> int:
    seen = {id(t): t for _, t in named}
    return sum(t.numel() * t.element_size() for t in seen.values())


def tensor_ids(module: nn.Module, skip: str | None = None) -> set[int]:
    """ids of every parameter/buffer object under `module` (children named `skip` left out): a
    cheap walk for noticing tensors replaced since a group was packed."""
    ids, stack = set(), [module]
    while stack:
        m = stack.pop()
        ids.update(id(t) for t in m._parameters.values() if t is not None)
        ids.update(id(t) for t in m._buffers.values() if t is not None)
        stack.extend(c for n, c in m._modules.items()
                     if c is not None and not (m is module and n == skip))
    return ids


def report_move(event: str, index, module: nn.Module, on_move=None) -> None:
    """After a move: the layout check (when WANVIDEO_CHECK_LAYOUT is on) and the caller's hook."""
    where = f"BlockSwap {event} " + ("non-block parameters" if index is None else f"block {index}")
    placement.verify(module, where)
    if on_move is not None:
        on_move(event, index, module)


def _owner(root: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    path, _, leaf = dotted.rpartition(".")
    return (root.get_submodule(path) if path else root), leaf


def _collect(root: nn.Module, named: list[tuple[str, torch.Tensor]]):
    """Unique tensors (shared ones once) with every (owner module, leaf) that refers to them."""
    index, tensors, owners = {}, [], []
    for name, t in named:
        if t.device.type == "meta":
            raise ValueError(f"BlockSwap: {name!r} is still on the meta device (not materialized)")
        if id(t) not in index:
            index[id(t)] = len(tensors)
            tensors.append(t.detach())
            owners.append([])
        owners[index[id(t)]].append(_owner(root, name))
    return tensors, owners


class HostGroup:
    """One group's host master: the flat buffer, where each tensor lives in it, and the host-view
    tensors (prepared once) that the group's modules point at between forwards."""

    def __init__(self, root: nn.Module, named: list[tuple[str, torch.Tensor]], pin: bool):
        """Pack the tensors `named` (relative to `root`) into a new host master and point every
        owner at it."""
        tensors, owners = _collect(root, named)
        self.flat, spans = placement.pack_flat(tensors, "cpu", pin=pin)
        self.pinned = pin
        self.used = max((off + n for off, n in spans), default=0)   # bytes one copy moves
        self.payload = self.flat[:self.used]
        self.entries = []    # (dtype, shape, stride, offset in elements, [(module, leaf)])
        self.host = []       # (module, leaf, host-view Parameter or buffer)
        for t, own, (off, _) in zip(tensors, owners, spans):
            view = placement.view_in(self.flat, off, t)
            self.entries.append((t.dtype, tuple(t.shape), view.stride(), off // t.element_size(),
                                 own))
            for module, leaf in own:
                held = (nn.Parameter(view, requires_grad=False) if leaf in module._parameters
                        else view)
                self.host.append((module, leaf, held))
        self.host_ids = {id(held) for _, _, held in self.host}
        self.point_at_host()

    @property
    def tensor_bytes(self) -> int:
        return sum(held.numel() * held.element_size()
                   for held in {id(h): h for _, _, h in self.host}.values())

    def point_at_host(self) -> None:
        for module, leaf, held in self.host:
            placement.adopt_tensor(module, leaf, held)

    def point_at(self, buffer: torch.Tensor, typed: dict) -> None:
        """Point every tensor at its place in `buffer`, a device copy of this master. `typed`
        caches the buffer's per-dtype views (one dict per buffer, kept by its owner)."""
        for dtype, shape, stride, offset, owners in self.entries:
            base = typed.get(dtype)
            if base is None:
                base = typed[dtype] = buffer.view(dtype)
            view = base.as_strided(shape, stride, offset)
            for module, leaf in owners:
                placement.adopt_tensor(module, leaf, view)

    def is_stale(self, current_ids: set[int]) -> bool:
        """True when the modules hold other tensors than this master's (layers injected,
        quantized or LoRA-merged since packing): the group must be packed again."""
        return current_ids != self.host_ids

    def holds(self, named: list[tuple[str, torch.Tensor]]) -> bool:
        """True when every tensor in `named` is a view of this master (the between-forwards
        state of the group's modules)."""
        lo, hi = self.flat.data_ptr(), self.flat.data_ptr() + self.flat.numel()
        return all(t.numel() == 0 or lo <= t.data_ptr() < hi for _, t in named)


class DeviceSlots:
    """`count` aligned flat device buffers of `nbytes` each that host masters are copied into
    (BlockSwap's ring of prefetch + 1 slots, or the one buffer of the onloaded non-blocks)."""

    def __init__(self, device: torch.device, count: int, nbytes: int):
        self.nbytes = nbytes
        self.buffers = [placement.empty_flat(nbytes, device) for _ in range(count)]
        self.typed = [{} for _ in range(count)]

    def __len__(self) -> int:
        return len(self.buffers)

    def total_bytes(self) -> int:
        return sum(b.numel() for b in self.buffers)

    def load(self, s: int, group: HostGroup, overlap: bool) -> None:
        """Queue (or, overlap=False, do) the copy of `group`'s master into buffer `s`."""
        placement.copy_bytes(self.buffers[s], group.payload, overlap)

    def point(self, s: int, group: HostGroup) -> None:
        group.point_at(self.buffers[s], self.typed[s])
