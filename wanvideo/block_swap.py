"""BlockSwap: transformer blocks live in host RAM and stream to the compute device just in time.

The facade over three parts (docs/ARCHITECTURE.md §5), split the way diffusers separates
ModuleGroup / GroupOffloadingHook / apply_group_offloading:

- policy, `swap_sizing.py`: how many blocks to swap ("auto": free memory and the activation
  estimate for the requested tokens);
- data, `swap_groups.py`: host masters (one flat, pinned host buffer per block and one for the
  non-block tensors), device slots, the byte copies and re-pointing (through `placement`);
- control, `swap_stream.py`: when copies happen (side stream, events, waits, statistics).

This module holds the settings, decides which groups exist, and is what the model sees:

    swap = BlockSwap(blocks_to_swap=20, device="cuda", prefetch=1).attach(model)
    ...  model(...)  ...               # every forward streams; swap.stats() reports
    swap.configure(prefetch=2, tokens=...)   # next prompt, other settings: rebuilds what changed
    swap.detach(model, to="cuda")      # or to=None: host master views stay the parameters

One way in: `model.block_streamer`. WanModel.forward calls begin_forward(model) before it reads
its first weight, before_block(i)/after_block(i) around each block and end_forward(ok) after the
head, also when an error or an interrupt escapes. So the non-block parameters can be onloaded and
offloaded in the same place as the blocks, with no torch hooks on the side. The sampler node
reaches the same object through `model.block_streamer` and calls `configure`/`release`.
"""
from __future__ import annotations

import dataclasses
import logging
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from . import memory, placement
from .swap_groups import (HostGroup, module_tensors, non_block_tensors, report_move,
                          tensor_ids)
from .swap_sizing import (DEFAULT_RESERVE_BYTES, MAX_PREFETCH, auto_blocks_to_swap,
                          estimate_activation_bytes, estimate_blocks_to_swap)
from .swap_stream import SwapStream

__all__ = ["BlockSwap", "SwapSettings", "install", "estimate_activation_bytes",
           "estimate_blocks_to_swap", "MAX_PREFETCH", "DEFAULT_RESERVE_BYTES"]

log = logging.getLogger(__name__)


def _can_pin(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_available()


@dataclass(frozen=True)
class SwapSettings:
    """Everything BlockSwap can be told (see BlockSwap). Validated on construction; `device`
    is normalised (a bare "cuda" becomes the current CUDA device, so placement checks compare
    equal to where tensors actually are)."""

    blocks_to_swap: int | str = "auto"
    device: torch.device | str = "cuda"
    prefetch: int = 1
    offload_non_blocks: bool = False
    pin: bool = True
    release_after_run: bool = True
    timing: bool = True
    tokens: int | None = None
    batch: int = 1
    reserve_bytes: int = DEFAULT_RESERVE_BYTES
    memory_info: Callable[[], tuple[int, int]] | None = None
    on_move: Callable | None = None
    log_stats: bool = False

    def __post_init__(self):
        if not (isinstance(self.prefetch, int) and 1 <= self.prefetch <= MAX_PREFETCH):
            raise ValueError(f"prefetch must be 1..{MAX_PREFETCH}, got {self.prefetch!r}")
        n = self.blocks_to_swap
        if n != "auto" and not (isinstance(n, int) and n >= 0):
            raise ValueError(f"blocks_to_swap must be 'auto' or an int >= 0, got {n!r}")
        device = torch.device(self.device)
        if device.type == "cuda" and device.index is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        object.__setattr__(self, "device", device)

    @property
    def pinned(self) -> bool:
        """Pinned host masters: asked for, and streaming to a CUDA device."""
        return bool(self.pin) and _can_pin(self.device)


class BlockSwap:
    """Streams the last `blocks_to_swap` blocks of a WanModel between host and `device`.

    Arguments (all of them `SwapSettings` fields; `configure` changes them later):
      blocks_to_swap: int 0..num_layers, or "auto" (needs `tokens`; sized from free VRAM, see
        `swap_sizing.auto_blocks_to_swap`), re-sized at every configure.
      device: the compute device (ComfyUI passes its torch device; the library never guesses).
      prefetch: blocks copying ahead of the running one (1..3); prefetch + 1 device slots.
      offload_non_blocks: keep embeddings/head/img_emb/audio_proj in host RAM between forwards.
      pin: pin host masters when streaming to CUDA (pageable copies are 3-7x slower).
      release_after_run: drop slots, streams and events after every forward (ComfyUI caches the
        model object across prompts, and the VAE decode wants the VRAM back).
      timing: record copy/wait times with CUDA events (one host sync per forward).
      tokens, batch: the requested sequence length (latent F*H*W/4) for auto sizing.
      reserve_bytes: VRAM left free by auto sizing; memory_info: callable returning (free, total)
        bytes (defaults to the CUDA figures; tests inject fake numbers).
      on_move: callable(event, block_index_or_None, module) after every re-pointing (tests run the
        layout checker there); WANVIDEO_CHECK_LAYOUT=1 runs placement.verify after every move too.
      log_stats: log a summary at the end of every forward.
    """

    def __init__(self, blocks_to_swap: int | str = "auto", device="cuda", prefetch: int = 1,
                 offload_non_blocks: bool = False, pin: bool = True,
                 release_after_run: bool = True, timing: bool = True, tokens: int | None = None,
                 batch: int = 1, reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                 memory_info: Callable[[], tuple[int, int]] | None = None,
                 on_move: Callable | None = None, log_stats: bool = False):
        self.settings = SwapSettings(blocks_to_swap, device, prefetch, offload_non_blocks, pin,
                                     release_after_run, timing, tokens, batch, reserve_bytes,
                                     memory_info, on_move, log_stats)
        self.blocks_to_swap = 0             # N in effect (the requested one, or auto's)
        self.host_buffers_allocated = 0     # host masters packed: flat across forwards
        self._model = None                  # weakref to the attached model
        self._blocks = None                 # the model's ModuleList
        self._groups: dict[int, HostGroup] = {}
        self._swapped: list[int] = []
        self._non_blocks: HostGroup | None = None
        self._stream = SwapStream()
        self._sync_stream()

    # settings, read as attributes
    device = property(lambda self: self.settings.device)
    prefetch = property(lambda self: self.settings.prefetch)
    offload_non_blocks = property(lambda self: self.settings.offload_non_blocks)
    requested = property(lambda self: self.settings.blocks_to_swap)
    pin = property(lambda self: self.settings.pinned, doc="host masters are pinned")

    # ------------------------------------------------------------------ install / configure

    def attach(self, model: nn.Module) -> "BlockSwap":
        """Install on `model`: pack host masters, place the rest, set model.block_streamer."""
        current = getattr(model, "block_streamer", None)
        if current is not None and current is not self:
            raise ValueError("model already has a block streamer; detach it first")
        if self._model is not None and self._model() is not model:
            raise ValueError("this BlockSwap is attached to another model")
        fresh = self._model is None
        self._model, self._blocks = weakref.ref(model), model.blocks
        try:
            self._apply(model, self._target_blocks(model, self.settings))
        except BaseException:
            if fresh:
                self._model = self._blocks = None
            raise
        model.block_streamer = self
        return self

    def configure(self, settings: SwapSettings | None = None, **changes) -> "BlockSwap":
        """Take new settings between forwards: a whole `settings`, and/or keyword changes to the
        current ones. On an attached model only what the change needs is rebuilt:

        - prefetch, timing, device: the slot ring is re-made at the next forward (slots are
          dropped here in any case); host masters stay;
        - blocks_to_swap, or "auto" with other tokens / batch / free memory / prefetch /
          reserve: blocks joining the swap set are packed, blocks leaving it move to the device;
        - pin: masters whose pinning differs are packed again (only those);
        - offload_non_blocks: the non-block tensors are packed, or moved to the device;
        - log_stats, on_move, memory_info, release_after_run: nothing to rebuild.
        """
        if self._stream.in_forward:
            raise RuntimeError("cannot re-configure BlockSwap during a forward")
        new = dataclasses.replace(settings or self.settings, **changes)
        model = self._model() if self._model is not None else None
        self.release()                 # before auto sizing: free slots count as free memory
        n = self._target_blocks(model, new) if model is not None else 0
        self.settings = new            # only once the new settings proved valid
        self._sync_stream()
        if model is not None:
            self._apply(model, n)
        return self

    def set_blocks_to_swap(self, n: int) -> None:
        """Swap the last n blocks from now on (configure(blocks_to_swap=n))."""
        self.configure(blocks_to_swap=n)

    def set_prefetch(self, prefetch: int) -> None:
        """Copy `prefetch` blocks ahead from now on (configure(prefetch=prefetch))."""
        self.configure(prefetch=prefetch)

    def detach(self, model: nn.Module, to=None) -> None:
        """Uninstall. `to` = a device: every swapped/offloaded tensor becomes an ordinary resident
        tensor there (host masters are then freed). `to=None`: the host master views stay the
        parameters (no copy; the pinned buffers live as long as the model)."""
        self.release()
        if to is not None:
            for i in list(self._groups):
                placement.move_module(self._blocks[i], to)
                self._moved("restore", i, self._blocks[i])
            if self._non_blocks is not None:
                self._non_blocks_to(model, to)
        self._groups.clear()
        self._non_blocks, self._swapped, self.blocks_to_swap = None, [], 0
        self._stream.assign(None, [], {}, None)
        if getattr(model, "block_streamer", None) is self:
            model.block_streamer = None
        self._model = self._blocks = None

    def release(self) -> None:
        """Free device slots, streams and events (and the onloaded non-block buffer)."""
        self._stream.release()

    # ------------------------------------------------------------------ bringing the model to the settings

    def _sync_stream(self) -> None:
        s, stream = self.settings, self._stream
        stream.device, stream.prefetch, stream.timing = s.device, s.prefetch, s.timing
        stream.release_after_run, stream.on_move = s.release_after_run, s.on_move

    def _target_blocks(self, model: nn.Module, s: SwapSettings) -> int:
        layers = len(model.blocks)
        if s.blocks_to_swap == "auto":
            return auto_blocks_to_swap(model, s.device, s.tokens, s.batch, s.prefetch,
                                       s.reserve_bytes, s.memory_info)
        if s.blocks_to_swap > layers:
            raise ValueError(f"blocks_to_swap={s.blocks_to_swap} but the model has only "
                             f"{layers} blocks")
        return s.blocks_to_swap

    def _apply(self, model: nn.Module, n: int) -> None:
        """Make the model match the settings with `n` blocks swapped, touching only what differs.
        Moves that free device memory (packing) run before moves that take it (resident)."""
        layers = len(self._blocks)
        wanted = list(range(layers - n, layers))
        before = (self.blocks_to_swap, self.host_buffers_allocated)
        memory.return_freed_host_memory()  # packing replaces every swapped tensor
        if self.offload_non_blocks:
            self._pack_non_blocks(model)
        for i in wanted:
            self._pack_block(i)
        for i in sorted(set(self._groups).difference(wanted)):
            placement.move_module(self._blocks[i], self.device)
            del self._groups[i]
            self._moved("resident", i, self._blocks[i])
        for i in range(layers - n):
            if any(t.device != self.device for _, t in placement.named_tensors(self._blocks[i])):
                placement.move_module(self._blocks[i], self.device)
                self._moved("resident", i, self._blocks[i])
        if not self.offload_non_blocks:
            self._non_blocks_to(model, self.device)
        self._swapped, self.blocks_to_swap = wanted, n
        self._stream.assign(self._blocks, wanted, self._groups, self._non_blocks)
        if (n, self.host_buffers_allocated) != before:
            memory.trim_host_memory()
            log.info("BlockSwap: %d of %d blocks swapped (%d host buffers packed), prefetch %d, "
                     "%s host memory%s", n, layers, self.host_buffers_allocated - before[1],
                     self.prefetch, "pinned" if self.pin else "pageable",
                     ", non-block weights offloaded" if self.offload_non_blocks else "")

    def _pack_block(self, i: int) -> None:
        """Pack block i unless its master is current (exists, same pinning, same tensors)."""
        group, block = self._groups.get(i), self._blocks[i]
        if group is not None and group.pinned == self.pin and not group.is_stale(tensor_ids(block)):
            return
        self._groups[i] = HostGroup(block, module_tensors(block), self.pin)
        self.host_buffers_allocated += 1
        self._moved("offload", i, block)

    def _pack_non_blocks(self, model: nn.Module) -> None:
        group = self._non_blocks
        if group is not None and group.pinned == self.pin \
                and not group.is_stale(tensor_ids(model, skip="blocks")):
            return
        self._non_blocks = HostGroup(model, non_block_tensors(model), self.pin)
        self.host_buffers_allocated += 1
        self._moved("offload", None, model)

    def _non_blocks_to(self, model: nn.Module, device) -> None:
        """Non-block tensors as ordinary tensors on `device` (out of their master, if any)."""
        device, moved = torch.device(device), False
        for name, t in non_block_tensors(model):
            if self._non_blocks is not None or t.device != device:
                placement.set_tensor(model, name, t, device=device)
                moved = True
        self._non_blocks = None
        if moved:
            self._moved("resident", None, model)

    def _refresh_stale(self, model: nn.Module) -> None:
        """Re-pack groups whose tensors were replaced since packing (InfiniteTalk injection,
        quantization or a LoRA merge after attach), so bytes follow the actual storage."""
        packed = self.host_buffers_allocated
        for i in self._swapped:
            self._pack_block(i)
        if self._non_blocks is not None:
            self._pack_non_blocks(model)
        if self.host_buffers_allocated != packed:
            log.debug("BlockSwap: tensors replaced since packing; re-packed")
            self._stream.assign(self._blocks, self._swapped, self._groups, self._non_blocks)

    def _moved(self, event: str, index, module: nn.Module) -> None:
        report_move(event, index, module, self.settings.on_move)

    # ------------------------------------------------------------------ the model's protocol

    def begin_forward(self, model: nn.Module) -> None:
        if self._stream.in_forward:        # a previous forward never ended: recover first
            self._stream.end(False)
        if self._swapped or self._non_blocks is not None:
            self._refresh_stale(model)
        self._stream.begin(model)

    def before_block(self, i: int) -> None:
        self._stream.before(i)

    def after_block(self, i: int) -> None:
        self._stream.after(i)

    def end_forward(self, ok: bool) -> None:
        if not self._stream.in_forward:
            return
        self._stream.end(ok)
        if self.settings.log_stats:
            self.log_summary()

    # ------------------------------------------------------------------ statistics

    def reset_stats(self) -> None:
        self._stream.reset_counters()

    def stats(self) -> dict:
        out = dict(self._stream.counters)
        run, nb = self._stream.run, self._non_blocks
        out.update(
            blocks_swapped=self.blocks_to_swap, prefetch=self.prefetch, device=str(self.device),
            host_master_bytes=sum(g.flat.numel() for g in self._groups.values())
            + (nb.flat.numel() if nb is not None else 0),
            slot_bytes=run.slots.total_bytes() if run is not None else 0, pinned=self.pin,
            offload_non_blocks=self.offload_non_blocks, auto=self.requested == "auto")
        return out

    def log_summary(self) -> None:
        s = self.stats()
        log.info("BlockSwap: %d forward(s), %d blocks swapped, %.2f GB moved, copy %.1f ms, "
                 "compute waited %.1f ms, peak VRAM %.2f GB (+%.2f GB during forward)%s",
                 s["forwards"], s["blocks_swapped"], s["bytes_moved"] / 1e9, s["copy_ms"],
                 s["wait_ms"], s["peak_vram_bytes"] / 1e9, s["peak_vram_delta_bytes"] / 1e9,
                 f", {s['interrupted']} interrupted" if s["interrupted"] else "")

    # ------------------------------------------------------------------ introspection

    @property
    def swapped_blocks(self) -> list[int]:
        return list(self._swapped)

    def master_of(self, i: int) -> HostGroup:
        return self._groups[i]

    def points_at_master(self, i: int) -> bool:
        """True when every tensor of swapped block i is its host master view (consistent state)."""
        return self._groups[i].holds(module_tensors(self._blocks[i]))


def install(model: nn.Module, blocks_to_swap: int | str = "auto", device="cuda",
            **kwargs) -> BlockSwap:
    """Make `model` stream with exactly these settings (what they do not name takes its default):
    a new BlockSwap attached now, or the one a previous run left on this model (ComfyUI caches
    it across prompts) re-configured, rebuilding only what the new settings change."""
    settings = SwapSettings(blocks_to_swap, device, **kwargs)
    current = getattr(model, "block_streamer", None)
    if current is None:
        return BlockSwap(device=settings.device).configure(settings).attach(model)
    if not isinstance(current, BlockSwap):
        raise ValueError(f"model carries another block streamer ({type(current).__name__})")
    return current.configure(settings)
