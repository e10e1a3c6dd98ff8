"""BlockSwap control: when bytes move (docs/ARCHITECTURE.md §5).

`SwapStream` runs one forward's schedule over the groups the facade hands it:

- begin: the non-block group (when offloaded) is copied in on the compute stream, then the first
  prefetch + 1 swapped blocks start copying into the slot ring on a side stream;
- before block i: the compute stream waits for block i's copy (an event, no host sync) and the
  block is pointed at its slot;
- after block i: the block points at its host master again, an event marks its slot free, and the
  copy of swapped block k + len(slots) is queued behind that event;
- end (always, also after an error or interrupt): blocks still on a slot and the non-blocks go
  back to their host masters, the compute stream waits for the copy stream, statistics are read,
  and with release_after_run the slots are dropped.

Swapped block k (in forward order) always uses slot k % len(slots). On CPU the same path runs
with synchronous copies. Nothing here decides which blocks are swapped (swap_sizing, the facade)
or how bytes are laid out (swap_groups).
"""
from __future__ import annotations

import time

import torch
from torch import nn

from . import placement
from .swap_groups import DeviceSlots, HostGroup, report_move


class _Run:
    """What exists only while streaming: slots, the copy stream and its events."""

    def __init__(self, device: torch.device, count: int, slot_bytes: int, ordinals: int,
                 timing: bool):
        self.cuda = device.type == "cuda"
        self.slots = DeviceSlots(device, count, slot_bytes)
        self.count, self.ordinals = count, ordinals
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=device)
            make = lambda t=timing: torch.cuda.Event(enable_timing=t)  # noqa: E731
            self.copy_start = [make() for _ in range(ordinals)]
            self.copy_done = [make() for _ in range(ordinals)]
            self.wait_start = [make() for _ in range(ordinals)]
            self.wait_end = [make() for _ in range(ordinals)]
            self.slot_free = [torch.cuda.Event() for _ in range(count)]
        self.compute = None
        self.reset()

    def fits(self, count: int, slot_bytes: int, ordinals: int) -> bool:
        return (self.count == count and self.slots.nbytes >= slot_bytes
                and (not self.cuda or self.ordinals == ordinals))

    def reset(self) -> None:
        self.issued = 0            # ordinals whose copy has been queued this forward
        self.consumed = 0          # ordinals whose compute has started (waited on)
        self.slot_used = [False] * self.count   # slot_free recorded this forward
        self.on_slot = {}          # block index -> slot, while its tensors point there
        self.copy_seconds = 0.0    # CPU path only


def _counters() -> dict:
    return {"forwards": 0, "interrupted": 0, "bytes_moved": 0, "copy_ms": 0.0, "wait_ms": 0.0,
            "peak_vram_bytes": 0, "peak_vram_delta_bytes": 0}


class SwapStream:
    """The schedule of one forward at a time. The facade sets the fields under "settings" and
    calls `assign` between forwards; the model's protocol calls begin/before/after/end."""

    def __init__(self):
        # settings
        self.device = torch.device("cpu")
        self.prefetch, self.timing, self.release_after_run = 1, True, True
        self.on_move = None
        # what to stream
        self.blocks: nn.ModuleList | None = None
        self.order: list[HostGroup] = []      # swapped blocks' groups, in forward order
        self.ordinal: dict[int, int] = {}     # block index -> position in `order`
        self.non_blocks: HostGroup | None = None
        # per forward
        self.run: _Run | None = None
        self.nb_slot: DeviceSlots | None = None
        self.nb_on_device = False
        self.in_forward = False
        self.model = None
        self.notify = None                    # report_move, when someone listens
        self.forward_base = None              # device memory allocated when the forward began
        self.counters = _counters()

    def assign(self, blocks, swapped: list[int], groups: dict[int, HostGroup],
               non_blocks: HostGroup | None) -> None:
        self.blocks = blocks
        self.order = [groups[i] for i in swapped]
        self.ordinal = {i: k for k, i in enumerate(swapped)}
        self.non_blocks = non_blocks

    def reset_counters(self) -> None:
        self.counters = _counters()

    def _notify(self, event: str, index, module: nn.Module) -> None:
        report_move(event, index, module, self.on_move)

    # ------------------------------------------------------------------ one forward

    def begin(self, model: nn.Module) -> None:
        if self.in_forward:            # a previous forward never ended: recover first
            self.end(False)
        self.in_forward, self.model = True, model
        self.notify = (self._notify if self.on_move is not None or placement.checking_enabled()
                       else None)
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                self.forward_base = torch.cuda.memory_allocated(self.device)
            if self.non_blocks is not None:
                self._onload_non_blocks()
            if self.order:
                self._start_copies()
        except BaseException:
            self.end(False)
            raise

    def _start_copies(self) -> None:
        slot_bytes = max(g.used for g in self.order)
        count = min(self.prefetch + 1, len(self.order))
        run = self.run
        if run is None or not run.fits(count, slot_bytes, len(self.order)):
            self.run = None            # free the old ring before allocating the new one
            run = self.run = _Run(self.device, count, slot_bytes, len(self.order), self.timing)
        run.reset()
        if run.cuda:                   # slots may reuse memory last used by the compute stream
            run.compute = torch.cuda.current_stream(self.device)
            run.copy_stream.wait_stream(run.compute)
        for k in range(count):
            self._issue(k)

    def _issue(self, k: int) -> None:
        """Queue the copy of swapped block ordinal k into its slot."""
        run = self.run
        s = k % run.count
        group = self.order[k]
        if run.cuda:
            with torch.cuda.stream(run.copy_stream):
                if run.slot_used[s]:   # the block last in this slot has finished computing
                    run.copy_stream.wait_event(run.slot_free[s])
                run.copy_start[k].record(run.copy_stream)
                run.slots.load(s, group, True)
                run.copy_done[k].record(run.copy_stream)
        else:
            t0 = time.perf_counter()
            run.slots.load(s, group, False)
            run.copy_seconds += time.perf_counter() - t0
        run.issued = k + 1
        self.counters["bytes_moved"] += group.used

    def before(self, i: int) -> None:
        k = self.ordinal.get(i)
        if k is None:
            return
        run = self.run
        while run.issued <= k:         # normally issued long before
            self._issue(run.issued)
        s = k % run.count
        if run.cuda:
            run.wait_start[k].record(run.compute)
            run.compute.wait_event(run.copy_done[k])
            run.wait_end[k].record(run.compute)
        run.consumed = k + 1
        run.slots.point(s, self.order[k])
        run.on_slot[i] = s
        if self.notify is not None:
            self.notify("onload", i, self.blocks[i])

    def after(self, i: int) -> None:
        k = self.ordinal.get(i)
        if k is None:
            return
        run = self.run
        s = run.on_slot.pop(i)
        self.order[k].point_at_host()
        if self.notify is not None:
            self.notify("offload", i, self.blocks[i])
        if run.cuda:
            run.slot_free[s].record(run.compute)
            run.slot_used[s] = True
        nxt = k + run.count
        if nxt < len(self.order):
            self._issue(nxt)

    def end(self, ok: bool) -> None:
        if not self.in_forward:
            return
        self.in_forward = False
        run = self.run
        try:
            if run is not None:
                self._finish_run(run, ok)
            if self.nb_on_device:
                self._offload_non_blocks()
        finally:
            self.counters["forwards"] += 1
            if not ok:
                self.counters["interrupted"] += 1
            if self.device.type == "cuda":
                self._record_peak()
            if self.release_after_run:
                self.run, self.nb_slot = None, None
            self.model = self.forward_base = None

    def _finish_run(self, run: _Run, ok: bool) -> None:
        for i in list(run.on_slot):    # interrupted inside a block
            run.on_slot.pop(i)
            self.order[self.ordinal[i]].point_at_host()
            if self.notify is not None:
                self.notify("offload", i, self.blocks[i])
        if run.cuda and run.compute is not None:
            run.compute.wait_stream(run.copy_stream)   # slot memory is reused only after copies
            if not ok or self.timing:
                run.copy_stream.synchronize()
            if self.timing:
                run.compute.synchronize()
        self._collect_times(run)
        run.reset()                    # counted once, even if the next forward fails early

    def release(self) -> None:
        """Drop slots, the copy stream, events and the non-block device buffer."""
        if self.in_forward:
            self.end(False)
        run, self.run = self.run, None
        if run is not None and run.cuda:
            torch.cuda.current_stream(self.device).wait_stream(run.copy_stream)
            run.copy_stream.synchronize()
        self.nb_slot = None

    # ------------------------------------------------------------------ non-block parameters

    def _onload_non_blocks(self) -> None:
        group = self.non_blocks
        if self.nb_slot is None or self.nb_slot.nbytes < group.used:
            self.nb_slot = None
            self.nb_slot = DeviceSlots(self.device, 1, group.used)
        self.nb_slot.load(0, group, group.pinned)
        self.counters["bytes_moved"] += group.used
        self.nb_slot.point(0, group)
        self.nb_on_device = True
        if self.notify is not None:
            self.notify("onload", None, self.model)

    def _offload_non_blocks(self) -> None:
        self.non_blocks.point_at_host()
        self.nb_on_device = False
        if self.notify is not None:
            self.notify("offload", None, self.model)

    # ------------------------------------------------------------------ statistics

    def _collect_times(self, run: _Run) -> None:
        if not run.cuda:
            self.counters["copy_ms"] += run.copy_seconds * 1e3
            return
        if not self.timing:
            return
        self.counters["copy_ms"] += sum(run.copy_start[k].elapsed_time(run.copy_done[k])
                                        for k in range(run.issued))
        self.counters["wait_ms"] += sum(run.wait_start[k].elapsed_time(run.wait_end[k])
                                        for k in range(run.consumed))

    def _record_peak(self) -> None:
        peak = torch.cuda.max_memory_allocated(self.device)
        c = self.counters
        c["peak_vram_bytes"] = max(c["peak_vram_bytes"], peak)
        if self.forward_base is not None:
            c["peak_vram_delta_bytes"] = max(c["peak_vram_delta_bytes"], peak - self.forward_base)
