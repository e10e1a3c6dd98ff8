"""BlockSwap: transformer blocks live in host RAM and stream to the compute device just in time.

How it works (docs/ARCHITECTURE.md §5):
- Host masters. Each swapped block's parameters and buffers (whatever they are: bf16 weights,
  InfiniteTalk `norm_x`/`audio_cross_attn`, fp8 weights and their scales) are packed ONCE into one
  flat host buffer per block (pinned when streaming to CUDA), every tensor at a 256-byte boundary
  (`placement.pack_flat`). Between forwards the block's parameters ARE views of that buffer, so the
  model is always consistent (`state_dict()` works) and nothing ever points at a freed device slot.
  Weights never change during sampling, so nothing is copied back: host RAM stays flat.
- Device slots. A ring of `prefetch + 1` flat byte buffers on the device, each the size of the
  largest swapped block. Swapped block k (in forward order) uses slot k % (prefetch + 1). When block
  i is about to run, blocks i+1..i+prefetch are already copying on a side stream. Events order it:
  copy done -> compute may read the slot; compute done (recorded after the block) -> the copy
  stream may overwrite that slot with block k + prefetch + 1.
- Re-pointing goes through `placement.adopt_tensor` (never `param.data`): before block i its
  tensors become sub-views of its slot, after it they are the host master views again.
- CPU runs (tests) take the same path; slots are plain host buffers and copies are synchronous.

Install on a model (the model calls the hooks; see WanModel.forward):

    swap = BlockSwap(blocks_to_swap=20, device="cuda", prefetch=1).attach(model)
    ...  model(...)  ...              # every forward streams; swap.stats() reports
    swap.detach(model, to="cuda")     # or to=None: host master views stay the parameters

`attach` also places the rest of the model: resident blocks and (unless `offload_non_blocks`)
the non-block parameters move to `device`. WanModel.forward runs the embeddings before
`begin_forward` and the head after `end_forward`, so offloaded non-block parameters are onloaded
by a forward pre-hook and offloaded by an always-called forward hook installed on the model.
"""
from __future__ import annotations

import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from . import placement

log = logging.getLogger(__name__)

MAX_PREFETCH = 3
DEFAULT_RESERVE_BYTES = 768 * 2 ** 20


# ----------------------------------------------------------------------------- sizing (auto mode)

def estimate_activation_bytes(tokens: int, dim: int, ffn_dim: int, dtype_bytes: int = 2,
                              context_tokens: int = 512 + 257, batch: int = 1) -> int:
    """Peak transient device memory of one forward, in bytes (an estimate, deliberately generous):

        batch * tokens * (dim * (32 + 4 * dtype_bytes) + 2 * ffn_dim * dtype_bytes)
      + batch * context_tokens * dim * (4 + 2 * dtype_bytes)

    Per token: the fp32 residual stream and the block's new residual (8*dim), the fp32 modulated
    norm and its temporaries plus the fp32 RoPE rotation of q and k (~24*dim), q/k/v/attention
    output in the compute dtype (4*dim*dtype_bytes), and the FFN hidden state with its GELU output
    (2*ffn_dim*dtype_bytes). Plus the embedded text+CLIP context. 14B, bf16, 32,760 tokens: ~7.4 GB.
    Refine with a measured first step (`BlockSwap.refine`)."""
    per_token = dim * (32 + 4 * dtype_bytes) + 2 * ffn_dim * dtype_bytes
    return int(batch * (tokens * per_token + context_tokens * dim * (4 + 2 * dtype_bytes)))


def estimate_blocks_to_swap(free_bytes: int, block_bytes: Sequence[int], non_block_bytes: int,
                            activation_bytes: int, prefetch: int = 1, reserve_bytes: int = 0) -> int:
    """Smallest N (swap the last N blocks) whose device footprint fits in `free_bytes`:

        resident blocks + non-block params + activations + reserve
        + min(prefetch + 1, N) slots of the largest swapped block   <=   free_bytes

    Returns len(block_bytes) when even swapping everything does not fit (the caller warns)."""
    layers = len(block_bytes)
    budget = free_bytes - reserve_bytes - non_block_bytes - activation_bytes
    for n in range(layers + 1):
        resident = sum(block_bytes[:layers - n])
        slots = min(prefetch + 1, n) * max(block_bytes[layers - n:]) if n else 0
        if resident + slots <= budget:
            return n
    return layers


# ----------------------------------------------------------------------------- host masters

def _owner(module: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    path, _, leaf = dotted.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


@dataclass
class _Master:
    """One module group's host copy: flat buffer, and where each tensor lives in it."""
    flat: torch.Tensor
    used: int                                   # bytes to copy (end of the last tensor)
    entries: list = field(default_factory=list)  # (owners [(module, leaf)], offset, host view)
    adopted: list = field(default_factory=list)  # the tensor objects last adopted (change check)

    @property
    def tensor_bytes(self) -> int:
        return sum(v.numel() * v.element_size() for _, _, v in self.entries)


def _collect(root: nn.Module, names: list[tuple[str, torch.Tensor]]):
    """Unique tensors (shared ones once) with every (owner module, leaf) that refers to them."""
    index, tensors, owners = {}, [], []
    for name, t in names:
        if t is None:
            continue
        if t.device.type == "meta":
            raise ValueError(f"BlockSwap: {name!r} is still on the meta device (not materialized)")
        key = id(t)
        if key not in index:
            index[key] = len(tensors)
            tensors.append(t.detach())
            owners.append([])
        owners[index[key]].append(_owner(root, name))
    return tensors, owners


def _pack(root: nn.Module, names: list[tuple[str, torch.Tensor]], pin: bool) -> _Master:
    tensors, owners = _collect(root, names)
    flat, spans = placement.pack_flat(tensors, "cpu", pin=pin)
    used = max((off + n for off, n in spans), default=0)
    entries = [(own, off, placement.view_in(flat, off, t))
               for own, (off, _), t in zip(owners, spans, tensors)]
    return _Master(flat, used, entries)


def _all_tensors(module: nn.Module, prefix: str = ""):
    out = [(prefix + n, t) for n, t in module.named_parameters(remove_duplicate=False)]
    out += [(prefix + n, t) for n, t in module.named_buffers(remove_duplicate=False)]
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# ----------------------------------------------------------------------------- per-run state

class _Run:
    """Everything that exists only while streaming (slots, streams, events); dropped on release."""

    def __init__(self, device: torch.device, slots: int, slot_bytes: int, ordinals: int,
                 timing: bool):
        self.cuda = device.type == "cuda"
        self.slot_bytes = slot_bytes
        self.slots = [torch.empty(max(slot_bytes, placement.PACK_ALIGNMENT), dtype=torch.uint8,
                                  device=device) for _ in range(slots)]
        if self.cuda:
            self.copy_stream = torch.cuda.Stream(device=device)
            make = lambda t=timing: torch.cuda.Event(enable_timing=t)  # noqa: E731
            self.copy_start = [make() for _ in range(ordinals)]
            self.copy_done = [make() for _ in range(ordinals)]
            self.wait_start = [make() for _ in range(ordinals)]
            self.wait_end = [make() for _ in range(ordinals)]
            self.slot_free = [torch.cuda.Event() for _ in range(slots)]
        self.reset()

    def reset(self):
        self.issued = 0            # ordinals whose copy has been queued this forward
        self.consumed = 0          # ordinals whose compute has started (waited on)
        self.slot_used = [False] * len(self.slots)   # slot_free event recorded this forward
        self.on_slot = {}          # block index -> slot index, while its tensors point there
        self.copy_seconds = 0.0    # CPU path only


class BlockSwap:
    """Streams the last `blocks_to_swap` blocks of a WanModel between host and `device`.

    Arguments:
      blocks_to_swap: int 0..num_layers, or "auto" (needs `tokens`; sized from free VRAM, see
        `estimate_blocks_to_swap` / `estimate_activation_bytes`).
      device: the compute device (ComfyUI passes its torch device; the library never guesses).
      prefetch: blocks copying ahead of the running one (1..3); prefetch + 1 device slots.
      offload_non_blocks: keep embeddings/head/img_emb/audio_proj in host RAM between forwards.
      pin: pin host masters when streaming to CUDA (pageable copies are 3-7x slower).
      release_after_run: drop slots, streams and events after every forward (ComfyUI caches the
        model object across prompts, and the VAE decode wants the VRAM back).
      timing: record copy/wait times with CUDA events (one host sync per forward).
      tokens, batch: the requested sequence length (latent F*H*W/4) for auto sizing.
      reserve_bytes: VRAM left free by auto sizing; memory_info: callable returning (free, total)
        bytes (defaults to torch.cuda.mem_get_info; tests inject fake numbers).
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
        if not (isinstance(prefetch, int) and 1 <= prefetch <= MAX_PREFETCH):
            raise ValueError(f"prefetch must be 1..{MAX_PREFETCH}, got {prefetch!r}")
        if blocks_to_swap != "auto" and not (isinstance(blocks_to_swap, int) and blocks_to_swap >= 0):
            raise ValueError(f"blocks_to_swap must be 'auto' or an int >= 0, got {blocks_to_swap!r}")
        self.requested = blocks_to_swap
        self.device = torch.device(device)
        self.prefetch = prefetch
        self.offload_non_blocks = offload_non_blocks
        self.pin = bool(pin) and self.device.type == "cuda" and torch.cuda.is_available()
        self.release_after_run = release_after_run
        self.timing = timing
        self.tokens, self.batch, self.reserve_bytes = tokens, batch, reserve_bytes
        self.memory_info = memory_info
        self.on_move = on_move
        self.log_stats = log_stats
        self.blocks_to_swap = 0
        self.host_buffers_allocated = 0     # pack_flat calls: stays flat across forwards
        self._model = None                  # weakref to the attached model
        self._blocks = None                 # the model's ModuleList
        self._masters: dict[int, _Master] = {}
        self._swapped: list[int] = []
        self._ordinal: dict[int, int] = {}
        self._nb_master: _Master | None = None
        self._nb_device: torch.Tensor | None = None
        self._nb_on_device = False
        self._hooks = []
        self._run: _Run | None = None
        self._in_forward = False
        self._fwd_base = None               # memory allocated when the forward started
        self.reset_stats()

    # ------------------------------------------------------------------ install / uninstall

    def attach(self, model: nn.Module) -> "BlockSwap":
        """Install on `model`: pack host masters, place the rest, set model.block_streamer."""
        current = getattr(model, "block_streamer", None)
        if current is not None and current is not self:
            raise ValueError("model already has a block streamer; detach it first")
        if self._model is not None and self._model() is not model:
            raise ValueError("this BlockSwap is attached to another model")
        self._model = weakref.ref(model)
        self._blocks = model.blocks
        layers = len(self._blocks)
        n = self._auto_blocks(model) if self.requested == "auto" else self.requested
        if n > layers:
            raise ValueError(f"blocks_to_swap={n} but the model has only {layers} blocks")
        self._place_non_blocks(model)
        self.set_blocks_to_swap(n)
        if not self._hooks:
            self._hooks = [model.register_forward_pre_hook(self._pre_forward),
                           model.register_forward_hook(self._post_forward, always_call=True)]
        model.block_streamer = self
        return self

    def detach(self, model: nn.Module, to=None) -> None:
        """Uninstall. `to` = a device: every swapped/offloaded tensor becomes an ordinary resident
        tensor there (host masters are then freed). `to=None`: the host master views stay the
        parameters (no copy; the pinned buffers live as long as the model)."""
        self.release()
        for h in self._hooks:
            h.remove()
        self._hooks = []
        if to is not None:
            for i in list(self._masters):
                placement.move_module(self._blocks[i], to)
                self._moved("restore", i, self._blocks[i])
            if self._nb_master is not None:
                for name, t in self._non_block_names(model):
                    placement.set_tensor(model, name, t, device=to)
                self._moved("restore", None, model)
        self._masters.clear()
        self._nb_master = None
        self._swapped, self._ordinal = [], {}
        self.blocks_to_swap = 0
        if getattr(model, "block_streamer", None) is self:
            model.block_streamer = None
        self._model = self._blocks = None

    def release(self) -> None:
        """Free device slots, streams and events (and the onloaded non-block buffer)."""
        if self._in_forward:
            self.end_forward(False)
        run, self._run = self._run, None
        if run is not None and run.cuda:
            torch.cuda.current_stream(self.device).wait_stream(run.copy_stream)
            run.copy_stream.synchronize()
        if self._nb_on_device:
            self._offload_non_blocks()
        self._nb_device = None

    def set_prefetch(self, prefetch: int) -> None:
        """Change the prefetch depth between forwards (the slot ring is rebuilt next forward)."""
        if not (isinstance(prefetch, int) and 1 <= prefetch <= MAX_PREFETCH):
            raise ValueError(f"prefetch must be 1..{MAX_PREFETCH}, got {prefetch!r}")
        self.release()
        self.prefetch = prefetch

    # ------------------------------------------------------------------ partition

    def set_blocks_to_swap(self, n: int) -> None:
        """Swap the last n blocks (between forwards). Blocks leaving the swap set become resident
        on the device; blocks joining it are packed into host masters."""
        layers = len(self._blocks)
        if not (isinstance(n, int) and 0 <= n <= layers):
            raise ValueError(f"blocks_to_swap={n} but the model has only {layers} blocks")
        if self._in_forward:
            raise RuntimeError("cannot change blocks_to_swap during a forward")
        self.release()
        wanted = set(range(layers - n, layers))
        for i in sorted(set(self._masters) - wanted):
            placement.move_module(self._blocks[i], self.device)
            del self._masters[i]
            self._moved("resident", i, self._blocks[i])
        for i in range(layers):
            if i in wanted and i not in self._masters:
                self._pack_block(i)
            elif i not in wanted:
                self._ensure_on_device(self._blocks[i], i)
        self._swapped = sorted(wanted)
        self._ordinal = {b: k for k, b in enumerate(self._swapped)}
        self.blocks_to_swap = n
        self._stats["blocks_swapped"] = n

    def _ensure_on_device(self, module: nn.Module, index) -> None:
        if any(t.device != self.device for _, t in placement.named_tensors(module)):
            placement.move_module(module, self.device)
            self._moved("resident", index, module)

    def _pack_block(self, i: int) -> None:
        block = self._blocks[i]
        master = _pack(block, _all_tensors(block), self.pin)
        self.host_buffers_allocated += 1
        self._masters[i] = master
        self._point_at_master(i)

    def _non_block_names(self, model: nn.Module):
        return [(n, t) for n, t in _all_tensors(model) if not n.startswith("blocks.")]

    def _place_non_blocks(self, model: nn.Module) -> None:
        names = self._non_block_names(model)
        if self.offload_non_blocks:
            if self._nb_master is None:
                self._nb_master = _pack(model, names, self.pin)
                self.host_buffers_allocated += 1
                self._adopt(self._nb_master, None, None)
                self._moved("offload", None, model)
            return
        moved = False
        for name, t in names:
            if t.device != self.device:
                placement.set_tensor(model, name, t, device=self.device)
                moved = True
        if moved:
            self._moved("resident", None, model)

    # ------------------------------------------------------------------ re-pointing

    def _adopt(self, master: _Master, flat: torch.Tensor | None, index) -> None:
        """Point every tensor of `master` at `flat` (a device slot) or, for None, the host views."""
        adopted = []
        for owners, off, host_view in master.entries:
            view = host_view if flat is None else placement.view_in(flat, off, host_view)
            for module, leaf in owners:
                placement.adopt_tensor(module, leaf, view)
                adopted.append(module._parameters[leaf] if leaf in module._parameters
                               else module._buffers[leaf])
        if flat is None:
            master.adopted = adopted

    def _point_at_master(self, i: int) -> None:
        self._adopt(self._masters[i], None, i)
        self._moved("offload", i, self._blocks[i])

    def _moved(self, event: str, index, module: nn.Module) -> None:
        where = f"BlockSwap {event} " + ("non-block parameters" if index is None else f"block {index}")
        placement.verify(module, where)
        if self.on_move is not None:
            self.on_move(event, index, module)

    def _refresh_changed_blocks(self) -> None:
        """Re-pack a swapped block whose tensors were replaced since it was packed (InfiniteTalk
        injection, quantization or a LoRA merge after attach), so bytes follow actual storage."""
        for i in self._swapped:
            master = self._masters[i]
            current = {id(t) for _, t in _all_tensors(self._blocks[i])}
            if current != {id(t) for t in master.adopted}:
                log.debug("BlockSwap: block %d changed since it was packed; re-packing", i)
                self._pack_block(i)

    # ------------------------------------------------------------------ forward hooks

    def _pre_forward(self, model, args):
        try:
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
                self._fwd_base = torch.cuda.memory_allocated(self.device)
            if self._nb_master is not None and not self._nb_on_device:
                self._onload_non_blocks()
        except BaseException:
            self._post_forward(model, args, None)
            raise

    def _post_forward(self, model, args, output):
        if self._in_forward:            # an error between begin_forward and the model's finally
            self.end_forward(False)
        if self._nb_on_device:
            self._offload_non_blocks()
        if self.release_after_run:
            self._nb_device = None
        if self.device.type == "cuda":
            self._record_peak()
        self._fwd_base = None

    def _onload_non_blocks(self) -> None:
        master = self._nb_master
        if self._nb_device is None or self._nb_device.numel() < master.used:
            self._nb_device = torch.empty(max(master.used, placement.PACK_ALIGNMENT),
                                          dtype=torch.uint8, device=self.device)
        self._nb_device[:master.used].copy_(master.flat[:master.used], non_blocking=self.pin)
        self._stats["bytes_moved"] += master.used
        self._adopt(master, self._nb_device, None)
        self._nb_on_device = True
        model = self._model() if self._model is not None else None
        if model is not None:
            self._moved("onload", None, model)

    def _offload_non_blocks(self) -> None:
        self._adopt(self._nb_master, None, None)
        self._nb_on_device = False
        model = self._model() if self._model is not None else None
        if model is not None:
            self._moved("offload", None, model)

    # ------------------------------------------------------------------ streamer protocol

    def begin_forward(self, model: nn.Module) -> None:
        if self._in_forward:            # a previous forward never ended: recover first
            self.end_forward(False)
        self._in_forward = True
        try:
            if self.device.type == "cuda" and self._fwd_base is None:
                self._fwd_base = torch.cuda.memory_allocated(self.device)
            if not self._swapped:
                return
            self._refresh_changed_blocks()
            slot_bytes = max(self._masters[i].used for i in self._swapped)
            slots = min(self.prefetch + 1, len(self._swapped))
            run = self._run
            if run is None or run.slot_bytes < slot_bytes or len(run.slots) != slots \
                    or (run.cuda and len(run.copy_done) != len(self._swapped)):
                self._run = None
                run = self._run = _Run(self.device, slots, slot_bytes, len(self._swapped), self.timing)
            run.reset()
            if run.cuda:   # slots may reuse memory last used by the compute stream
                run.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
            for k in range(min(len(run.slots), len(self._swapped))):
                self._issue(k)
        except BaseException:
            self.end_forward(False)
            raise

    def _issue(self, k: int) -> None:
        """Queue the copy of swapped block ordinal k into its slot."""
        run = self._run
        s = k % len(run.slots)
        master = self._masters[self._swapped[k]]
        dst, src = run.slots[s][:master.used], master.flat[:master.used]
        if run.cuda:
            with torch.cuda.stream(run.copy_stream):
                if run.slot_used[s]:       # the previous block in this slot has finished computing
                    run.copy_stream.wait_event(run.slot_free[s])
                run.copy_start[k].record(run.copy_stream)
                dst.copy_(src, non_blocking=True)
                run.copy_done[k].record(run.copy_stream)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            run.copy_seconds += time.perf_counter() - t0
        run.issued = k + 1
        self._stats["bytes_moved"] += master.used

    def before_block(self, i: int) -> None:
        k = self._ordinal.get(i)
        if k is None:
            return
        run = self._run
        while run.issued <= k:             # normally issued long before
            self._issue(run.issued)
        s = k % len(run.slots)
        if run.cuda:
            compute = torch.cuda.current_stream(self.device)
            run.wait_start[k].record(compute)
            compute.wait_event(run.copy_done[k])
            run.wait_end[k].record(compute)
        run.consumed = k + 1
        self._adopt(self._masters[i], run.slots[s], i)
        run.on_slot[i] = s
        self._moved("onload", i, self._blocks[i])

    def after_block(self, i: int) -> None:
        k = self._ordinal.get(i)
        if k is None:
            return
        run = self._run
        s = run.on_slot.pop(i)
        self._point_at_master(i)
        if run.cuda:
            run.slot_free[s].record(torch.cuda.current_stream(self.device))
            run.slot_used[s] = True
        nxt = k + len(run.slots)
        if nxt < len(self._swapped):
            self._issue(nxt)

    def end_forward(self, ok: bool) -> None:
        if not self._in_forward:
            return
        self._in_forward = False
        run = self._run
        try:
            if run is not None:
                for i in list(run.on_slot):     # interrupted inside a block
                    run.on_slot.pop(i)
                    self._point_at_master(i)
                if run.cuda:
                    compute = torch.cuda.current_stream(self.device)
                    compute.wait_stream(run.copy_stream)   # slot memory is reused only after copies
                    if not ok or self.timing:
                        run.copy_stream.synchronize()
                    if self.timing:
                        compute.synchronize()
                self._collect_times(run)
        finally:
            self._stats["forwards"] += 1
            if not ok:
                self._stats["interrupted"] += 1
            if self.device.type == "cuda":
                self._record_peak()
            if self.release_after_run:
                self._run = None
            if self.log_stats:
                self.log_summary()

    def _collect_times(self, run: _Run) -> None:
        if not run.cuda:
            self._stats["copy_ms"] += run.copy_seconds * 1e3
            return
        if not self.timing:
            return
        self._stats["copy_ms"] += sum(run.copy_start[k].elapsed_time(run.copy_done[k])
                                      for k in range(run.issued))
        self._stats["wait_ms"] += sum(run.wait_start[k].elapsed_time(run.wait_end[k])
                                      for k in range(run.consumed))

    def _record_peak(self) -> None:
        peak = torch.cuda.max_memory_allocated(self.device)
        self._stats["peak_vram_bytes"] = max(self._stats["peak_vram_bytes"], peak)
        if self._fwd_base is not None:
            self._stats["peak_vram_delta_bytes"] = max(self._stats["peak_vram_delta_bytes"],
                                                       peak - self._fwd_base)

    # ------------------------------------------------------------------ auto sizing

    def _model_bytes(self, model: nn.Module):
        blocks = [sum(_nbytes(t) for t in {id(t): t for _, t in _all_tensors(b)}.values())
                  for b in model.blocks]
        non_block = sum(_nbytes(t) for t in {id(t): t for _, t in self._non_block_names(model)}.values())
        on_device = sum(_nbytes(t) for _, t in placement.named_tensors(model) if t.device == self.device)
        return blocks, non_block, on_device

    def _activation_estimate(self, model: nn.Module) -> int:
        cfg = model.config
        dtype = getattr(model, "dtype", torch.bfloat16)
        return estimate_activation_bytes(self.tokens, cfg.dim, cfg.ffn_dim,
                                         torch.empty((), dtype=dtype).element_size(),
                                         cfg.text_len + (257 if cfg.has_image_embedding else 0),
                                         self.batch)

    def _auto_blocks(self, model: nn.Module, activation_bytes: int | None = None) -> int:
        if self.device.type != "cuda" and self.memory_info is None:
            return 0
        if self.tokens is None and activation_bytes is None:
            raise ValueError("blocks_to_swap='auto' needs tokens= (latent frames x H/16 x W/16)")
        free, _ = (self.memory_info or (lambda: torch.cuda.mem_get_info(self.device)))()
        blocks, non_block, on_device = self._model_bytes(model)
        act = self._activation_estimate(model) if activation_bytes is None else activation_bytes
        n = estimate_blocks_to_swap(free + on_device, blocks, non_block, act, self.prefetch,
                                    self.reserve_bytes)
        log.info("BlockSwap auto: %.2f GB free (+%.2f GB already placed), activations %.2f GB, "
                 "swapping %d of %d blocks", free / 1e9, on_device / 1e9, act / 1e9, n, len(blocks))
        return n

    def refine(self, measured_activation_bytes: int | None = None) -> int:
        """Measured-first-step refinement for auto mode: re-size N from the activation peak the
        last forward actually reached (peak VRAM delta minus the slots), or from a given number.
        Returns the (possibly new) N. A no-op for a fixed N."""
        model = self._model() if self._model is not None else None
        if self.requested != "auto" or model is None:
            return self.blocks_to_swap
        if measured_activation_bytes is None:
            slots = (min(self.prefetch + 1, len(self._swapped))
                     * max((self._masters[i].used for i in self._swapped), default=0))
            nb = self._nb_master.used if self._nb_master is not None else 0
            measured_activation_bytes = max(0, self._stats["peak_vram_delta_bytes"] - slots - nb)
        n = self._auto_blocks(model, measured_activation_bytes)
        if n != self.blocks_to_swap:
            self.set_blocks_to_swap(n)
        return n

    # ------------------------------------------------------------------ statistics

    def reset_stats(self) -> None:
        self._stats = {"forwards": 0, "interrupted": 0, "blocks_swapped": self.blocks_to_swap,
                       "bytes_moved": 0,
                       "copy_ms": 0.0, "wait_ms": 0.0, "peak_vram_bytes": 0,
                       "peak_vram_delta_bytes": 0}

    def stats(self) -> dict:
        out = dict(self._stats)
        out["prefetch"] = self.prefetch
        out["device"] = str(self.device)
        out["host_master_bytes"] = sum(m.flat.numel() for m in self._masters.values()) + (
            self._nb_master.flat.numel() if self._nb_master is not None else 0)
        out["slot_bytes"] = (sum(s.numel() for s in self._run.slots) if self._run is not None else 0)
        out["pinned"] = self.pin
        return out

    def log_summary(self) -> None:
        s = self._stats
        log.info("BlockSwap: %d forward(s), %d blocks swapped, %.2f GB moved, copy %.1f ms, "
                 "compute waited %.1f ms, peak VRAM %.2f GB (+%.2f GB during forward)%s",
                 s["forwards"], s["blocks_swapped"], s["bytes_moved"] / 1e9, s["copy_ms"],
                 s["wait_ms"], s["peak_vram_bytes"] / 1e9, s["peak_vram_delta_bytes"] / 1e9,
                 f", {s['interrupted']} interrupted" if s["interrupted"] else "")

    # ------------------------------------------------------------------ introspection

    @property
    def swapped_blocks(self) -> list[int]:
        return list(self._swapped)

    def master_of(self, i: int) -> _Master:
        return self._masters[i]

    def points_at_master(self, i: int) -> bool:
        """True when every tensor of swapped block i is its host master view (consistent state)."""
        master = self._masters[i]
        current = [t for _, t in _all_tensors(self._blocks[i])]
        lo, hi = master.flat.data_ptr(), master.flat.data_ptr() + master.flat.numel()
        return all(t.numel() == 0 or lo <= t.data_ptr() < hi for t in current)


def install(model: nn.Module, blocks_to_swap: int | str = "auto", device="cuda", **kwargs) -> BlockSwap:
    """Shorthand: BlockSwap(blocks_to_swap, device, **kwargs).attach(model)."""
    return BlockSwap(blocks_to_swap, device, **kwargs).attach(model)
