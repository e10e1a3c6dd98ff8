"""How the Ulysses all-to-alls move their bytes (SequenceParallel.transport).

`send_recv`: torch.distributed point-to-point ops (NCCL on GPUs, gloo on CPU). NCCL moves bytes
with kernels that need SMs; inside a split forward, attention and the GEMMs hold every SM, and on
2x H200 NCCL's send/receive fell from ~280 GB/s alone to ~80 GB/s (docs/BENCHMARKS.md), so part of
each exchange could not hide behind attention.

`copy_engine`: a GPU also has copy engines (DMA units) that move memory between GPUs over NVLink
or PCIe without any SM. Every rank of the group maps one workspace of torch.distributed's
symmetric memory (the same buffer, readable by every rank of the group); a rank writes what it
receives in its own workspace, and every rank writes its part for rank j straight into rank j's
workspace with plain device copies, which CUDA runs on the copy engines, on a side stream; the
compute stream waits for an event only where it reads the data. Our code moves no bytes itself:
device copies and torch's cross-rank barrier only.

Ordering. Each rank queues all transfers on one side stream, in the same order on every rank;
each waits for the compute stream (which produced what it sends), copies into the peers' slots,
and where the receiver needs the data next, ends with a barrier and an event:
    entry barrier, [q] [k] [v piece 0] barrier -> event, [v piece 1] barrier -> event, ...,
    [out piece 0] barrier -> event, ...
torch's barrier is a handshake between every pair of ranks: a rank passes its k-th barrier only
once every peer's side stream reached its k-th barrier, i.e. finished every copy queued before it,
so after the barrier everything sent to this rank before it has landed. The entry barrier of a
block's exchange is reached by a rank's side stream only after its compute stream got to that
block's q, i.e. after it read every buffer of the previous exchange; no peer writes before it, so
no slot is overwritten while it is read.

`auto` (the default) takes copy engines for CUDA tensors in an NCCL group when torch has symmetric
memory and every GPU of the group can map the others' memory (peer access; all ranks agree on it
once), send_recv otherwise.

Memory: the workspace (q/k/v and output receive buffers, 3 + 1 activations of one attention's
heads over all tokens: ~0.63 GiB per GPU for the 14B model, 832x480x81 on 2 GPUs) is allocated once
per group and kept; it lives outside torch's caching allocator, so torch.cuda.max_memory_allocated
does not count it.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Optional

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

TRANSPORTS = ("auto", "send_recv", "copy_engine")

# (group name, device index) -> _Workspace; built on the first split attention of a process.
_WORKSPACES: dict = {}
# (group name, device index) -> None (copy engines usable) or why not, agreed by all ranks.
_VERDICTS: dict = {}


def _symmetric_memory():
    try:
        from torch.distributed import _symmetric_memory as symm
    except ImportError:
        return None
    return symm if all(hasattr(symm, n) for n in ("empty", "rendezvous")) else None


def unavailable(group, device: torch.device) -> Optional[str]:
    """None when the copy-engine transport can serve `group` on `device`, else why not."""
    if device.type != "cuda":
        return f"the tensors are on {device}, not a CUDA device"
    backend = dist.get_backend(group)
    if backend != "nccl":
        return f"the process group's backend is {backend}, not nccl"
    if _symmetric_memory() is None:
        return f"torch {torch.__version__} has no symmetric memory"
    return None


def _peer_access(group, device: torch.device, on: Optional[torch.device] = None) -> Optional[str]:
    """Whether every rank of the group can map every other rank's GPU memory, agreed by all
    ranks (one rank falling back alone would leave the others waiting in a barrier). Consumer
    cards often have no peer access (PCIe P2P off): they keep send/recv. `on`: where the
    agreement's small tensors live (default `device`; tests agree over gloo on the CPU)."""
    key = (_group_name(group), device.index)
    if key not in _VERDICTS:
        on = device if on is None else on
        index = torch.tensor([device.index], device=on)
        indices = [torch.empty_like(index) for _ in range(dist.get_world_size(group))]
        dist.all_gather(indices, index, group=group)
        others = [i for i in map(int, indices) if i != device.index]
        blocked = [i for i in others if not torch.cuda.can_device_access_peer(device.index, i)]
        flag = torch.tensor([1 if blocked else 0], device=on)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        why = None
        if blocked:
            why = f"{device} has no peer access to cuda:{blocked[0]}"
        elif int(flag):
            why = "another rank's GPU has no peer access to the group's other GPUs"
        _VERDICTS[key] = why
        if why:
            log.info("sequence parallel: %s; the exchange uses send/recv", why)
    return _VERDICTS[key]


def _group_name(group) -> str:
    return (group if group is not None else dist.group.WORLD).group_name


class _Workspace:
    """One group's symmetric buffer on this rank, and the side stream that moves it."""

    def __init__(self, group, device: torch.device, nbytes: int):
        symm = _symmetric_memory()
        if hasattr(symm, "set_backend") and not _WORKSPACES:
            # The plain CUDA backend (IPC-mapped buffers, copy-engine friendly); NVSHMEM would
            # bootstrap its own runtime for nothing we use. Only possible before a first buffer.
            try:
                symm.set_backend("CUDA")
            except (RuntimeError, ValueError) as err:
                log.debug("symmetric memory keeps its backend: %s", err)
        self.nbytes = nbytes
        self.buffer = symm.empty(nbytes, dtype=torch.uint8, device=device)
        try:
            self.handle = symm.rendezvous(self.buffer, _group_name(group))
        except RuntimeError as err:
            raise RuntimeError(
                f"sequence parallel: symmetric memory for the copy-engine exchange failed on "
                f"{device} ({err}); set the WanVideo Multi-GPU node's transport to "
                f"send_recv") from err
        # High priority: the barrier and copy launches must not queue behind attention's blocks.
        self.stream = torch.cuda.Stream(device, priority=-1)


def _workspace(group, device: torch.device, nbytes: int) -> _Workspace:
    key = (_group_name(group), device.index)
    ws = _WORKSPACES.get(key)
    if ws is None or ws.nbytes < nbytes:
        if ws is not None:   # a longer window: nothing may still read the old buffer
            torch.cuda.synchronize(device)
        # Every rank reaches this with the same shapes (collective allocation).
        ws = _WORKSPACES[key] = _Workspace(group, device, nbytes)
        log.info("sequence parallel: copy-engine exchange through a %.0f MiB symmetric buffer "
                 "on %s", nbytes / 2 ** 20, device)
    return ws


class SendRecvLink:
    """The exchange as torch.distributed point-to-point ops: one batch of isend/irecv per
    transfer, peers only (all_to_all_single would route a rank's own chunk through NCCL's kernel
    too, which on 2x H200 doubled the bytes that kernel moved)."""

    name = "send_recv"

    def __init__(self, shard, in_shape: tuple, out_shape: tuple, like: torch.Tensor):
        self.shard, self.in_shape, self.out_shape, self.like = shard, in_shape, out_shape, like

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q/k/v send buffer, q/k/v receive buffer, output receive buffer)."""
        new = self.like.new_empty
        return new(self.in_shape), new(self.in_shape), new(self.out_shape)

    def start(self, region: str, buf: torch.Tensor, key, src, barrier: bool = True,
              entry: bool = False) -> Any:
        """Send src(j) to every peer j, into its buffer of `region` at key(this rank); receive
        peer j's into buf[key(j)]. Started asynchronously; `barrier` / `entry` only matter to
        the copy-engine link (send/recv pairs are their own synchronisation)."""
        sp, ops = self.shard.sp, []
        for j in range(sp.world):
            if j != sp.rank:
                peer = self.shard._global(j)
                ops += [dist.P2POp(dist.isend, src(j), peer, sp.group),
                        dist.P2POp(dist.irecv, buf[key(j)], peer, sp.group)]
        return dist.batch_isend_irecv(ops) if ops else []

    def wait(self, pending: Any) -> None:
        for work in pending:
            work.wait()


class CopyEngineLink:
    """The exchange as copies into the peers' symmetric buffers (module docstring): each rank
    pushes its slots for rank j into rank j's receive buffer, then the barrier tells every rank
    that what it receives has landed.

    Workspace layout: the q/k/v receive buffer `in_shape` [pieces, 3, world, ...] (slot
    [p, t, j]: what rank j sent of tensor t, piece p), then the output receive buffer
    `out_shape` [pieces, world, ...]."""

    name = "copy_engine"

    def __init__(self, group, rank: int, world: int, in_shape: tuple, out_shape: tuple,
                 like: torch.Tensor):
        n_in, n_out = math.prod(in_shape), math.prod(out_shape)
        self.rank, self.world, self.like, self.in_shape = rank, world, like, in_shape
        self.ws = _workspace(group, like.device, (n_in + n_out) * like.element_size())
        get = self.ws.handle.get_buffer
        self.slots = {"in": [get(j, in_shape, like.dtype, 0) for j in range(world)],
                      "out": [get(j, out_shape, like.dtype, n_in) for j in range(world)]}

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.like.new_empty(self.in_shape), self.slots["in"][self.rank],
                self.slots["out"][self.rank])

    def start(self, region: str, buf: torch.Tensor, key, src, barrier: bool = True,
              entry: bool = False) -> Any:
        """As SendRecvLink.start (`buf` is this rank's own buffer of `region`; the peers' are
        written through their mapped views). `entry`: first a barrier, so no peer is still
        reading what this transfer overwrites (its previous forward step's buffers). Without
        `barrier` nothing says the data landed: a later start's barrier covers it."""
        side = self.ws.stream
        side.wait_stream(torch.cuda.current_stream(buf.device))
        with torch.cuda.stream(side):
            if entry:
                self.ws.handle.barrier(channel=0)
            for j in range(self.world):
                if j != self.rank:
                    self.slots[region][j][key(self.rank)].copy_(src(j))
            if not barrier:
                return None
            self.ws.handle.barrier(channel=0)
            done = torch.cuda.Event()
            done.record(side)
        return done

    def wait(self, pending: Any) -> None:
        if pending is not None:
            torch.cuda.current_stream().wait_event(pending)


def link(shard, in_shape: tuple, out_shape: tuple, like: torch.Tensor):
    """The transport `shard.sp.transport` asks for, for tensors like `like`."""
    sp = shard.sp
    if sp.transport != "send_recv" and sp.world > 1:
        why = unavailable(sp.group, like.device) or _peer_access(sp.group, like.device)
        if why is None:
            return CopyEngineLink(sp.group, sp.rank, sp.world, in_shape, out_shape, like)
        if sp.transport == "copy_engine":
            raise RuntimeError(f"sequence parallel transport 'copy_engine' cannot run: {why}")
    return SendRecvLink(shard, in_shape, out_shape, like)
