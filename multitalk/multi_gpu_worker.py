"""The multi-GPU runtime, worker side: one process per device, all ranks in lock-step.

Started by multi_gpu.WorkerPool (`python -m wanvideo.multi_gpu_worker` with RANK, WORLD_SIZE,
MASTER_ADDR/PORT and WANVIDEO_MGPU_* in the environment) or by torchrun on one or several
hosts (then WANVIDEO_MGPU_DRIVER and WANVIDEO_MGPU_AUTHKEY name the driver; devices follow
LOCAL_RANK). Rank 0 connects to the driver; every command it receives goes to every rank with
broadcast_object_list over a gloo "control" group, so all ranks run the same commands in the
same order:

    ("load", ModelSpec)            every rank builds its model          -> ("loaded", info)
    ("window", job, swap, mode, sp_options)
                                   every rank denoises its share        -> ("done", latents, stats)
                                                                         or ("interrupted", ...)
    ("release",)                   BlockSwap device slots freed         -> ("released",)
    ("shutdown",)                  every rank leaves the group and exits

Interrupt: the driver's ("interrupt",) is read by rank 0's reader thread at any time; at every
block each rank joins a one-integer all_reduce(MAX) on the control group (gloo, CPU: no GPU
synchronisation; see StopAgreement), so all ranks raise SamplingInterrupted before the same
block. A rank whose
guidance share is smaller than another's still joins one check per block of the missing pass,
so the checks always pair up. In mode auto a step may run in rounds (choose_rounds): e.g. on 2
GPUs with 3 passes, passes 0 and 1 side by side, then pass 2 split over both. Any other
exception ends the worker (exit code 3) after reporting it; the driver then stops the others (a
collective cannot be left half-way safely).
"""
from __future__ import annotations

import dataclasses
import datetime
import importlib
import math
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from ..wanvideo.config import latent_tokens
from ..wanvideo.guidance_parallel import GuidanceParallel, parallel_layout
from ..wanvideo.sampling import SamplingCallbacks, SamplingInterrupted
from .multi_gpu import recv, send
from .window_job import WindowJob, run_window

ERROR_EXIT = 3
# Idle workers wait on the control group between prompts for as long as ComfyUI keeps the model.
IDLE_TIMEOUT = datetime.timedelta(days=30)


def choose_layout(world: int, passes: int, mode: str, num_heads: int) -> tuple[int, int]:
    """(sequence degree, guidance degree) with product `world`. auto: as many guidance ranks as
    split the passes evenly (no idle rank), the rest sequence parallel; sequence: all sequence;
    guidance: as many guidance ranks as there are passes, the rest sequence parallel. The
    sequence degree must divide the attention heads."""
    divisors = [d for d in range(1, world + 1) if world % d == 0]
    if mode == "sequence":
        options = [1]
    elif mode == "guidance":
        options = sorted((d for d in divisors if d <= passes), reverse=True)
    else:
        even = sorted((d for d in divisors if passes % d == 0), reverse=True)
        options = even + sorted((d for d in divisors if d <= passes and d not in even),
                                reverse=True)
    for g in options:
        if num_heads % (world // g) == 0:
            return world // g, g
    raise ValueError(f"{world} devices cannot share a model with {num_heads} attention heads "
                     f"in mode {mode!r} ({passes} pass(es) per step): the sequence-parallel "
                     "degree must divide the heads; use 2, 4, 5 or 8 GPUs for the 14B model")


def choose_rounds(world: int, passes: int, mode: str,
                  num_heads: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """The step's schedule: rounds of (sequence degree, guidance degree, plan indices), run one
    after the other. sequence / guidance: one round, choose_layout's layout for every pass.
    auto: while passes remain, the largest guidance degree g that divides `world`, is at most the
    passes left and leaves a sequence degree dividing the heads; the round takes as many passes
    as fill all g guidance ranks equally. A pass alone on a GPU is fully efficient, a split pass
    is not (2 x H200: 2.557 s alone, 1.444 s split in two = 89%), so on 2 GPUs 3 passes run as
    2 side by side + 1 split (4.00 s) rather than 3 split (4.33 s). A remainder no layout fits
    falls back to choose_layout for the whole plan (an idle rank, or the heads error)."""
    def one_round():
        return [(*choose_layout(world, passes, mode, num_heads), tuple(range(passes)))]

    if mode != "auto":
        return one_round()
    rounds, start = [], 0
    while start < passes:
        left = passes - start
        fits = [g for g in range(min(world, left), 0, -1)
                if world % g == 0 and num_heads % (world // g) == 0]
        if not fits:
            return one_round()
        g = fits[0]
        take = left // g * g
        rounds.append((world // g, g, tuple(range(start, start + take))))
        start += take
    return rounds


class StopAgreement:
    """block_hook: every rank learns at the same block whether rank 0 was asked to stop.

    Check k starts a one-integer all_reduce(MAX) without waiting for it; check k + 1 reads its
    result. The exchange (gloo, on the CPU, tens of microseconds to a millisecond) so overlaps
    the launch of a block instead of stalling it, and a stop still lands within one block of
    rank 0 seeing the request. Every rank reads the same check's result, so all stop at once."""

    def __init__(self, group, event: Optional[threading.Event]):
        self.group, self.event, self.checks = group, event, 0
        self.seen_at = None     # rank 0: the check that first carried the request
        self._pending = None

    def _collect(self) -> bool:
        if self._pending is None:
            return False
        work, flag = self._pending
        self._pending = None
        work.wait()
        return bool(int(flag.item()))

    def __call__(self, block: int) -> None:
        self.checks += 1
        stop = self._collect()
        if stop:
            raise SamplingInterrupted(-1, f"agreed before block {block} (check {self.checks})")
        asked = self.event is not None and self.event.is_set()
        if asked and self.seen_at is None:
            self.seen_at = self.checks
        flag = torch.tensor([int(asked)], dtype=torch.int32)
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (work, flag)

    def finish(self) -> None:
        """Complete the last exchange (every rank has one outstanding when a job ends)."""
        self._collect()


def guided_runner(gp: GuidanceParallel, checker: StopAgreement, blocks: int):
    """GuidanceParallel whose ranks with fewer passes join the stop checks of the missing ones
    (after their own passes, so real work overlaps first)."""
    def run_passes(plan, run_pass, like):
        mine = gp.mine(plan)
        idle = math.ceil(len(plan) / gp.world) - len(mine)
        done = [0]

        def idle_checks():
            for _ in range(idle * blocks):
                checker(-1)

        def counted(spec):
            out = run_pass(spec)
            done[0] += 1
            if done[0] == len(mine):
                idle_checks()
            return out

        if not mine:
            idle_checks()
        return gp(plan, counted, like)

    return run_passes


def scheduled_runner(model, rounds, checker: StopAgreement, blocks: int):
    """run_passes over rounds of (SequenceParallel, GuidanceParallel, plan indices): each round
    puts its own token split on the model and runs its passes on its guidance group; outputs come
    back in plan order. Every rank runs every round, so the collectives (and the stop checks,
    see guided_runner) pair up round by round."""
    def run_passes(plan, run_pass, like):
        out = [None] * len(plan)
        for sp, gp, indices in rounds:
            model.sequence_parallel = sp if sp.world > 1 else None
            sub = [plan[i] for i in indices]
            if gp.world > 1:
                got = guided_runner(gp, checker, blocks)(sub, run_pass, like)
            else:   # the whole group shares each pass: run them here one after the other
                got = [run_pass(spec) for spec in sub]
            for i, o in zip(indices, got):
                out[i] = o
        return out

    return run_passes


def load_checkpoint(device, paths, load_device: str = "main_device", **options):
    """The loader node's load on this worker: the same files and options; weights on this
    worker's device (main_device) or in host RAM (offload_device, streamed by BlockSwap)."""
    from ..wanvideo.loader import load_model
    from .inject import apply_infinitetalk_from_checkpoints

    target = device if load_device == "main_device" else torch.device("cpu")
    loaded = load_model(list(paths), device=target, compute_device=device,
                        inject=apply_infinitetalk_from_checkpoints, **options)
    return loaded.model


def resolve_factory(factory: str, sys_path=()):
    module, _, name = factory.partition(":")
    for p in reversed(sys_path):
        if p not in sys.path:
            sys.path.insert(0, p)
    package = __name__.rsplit(".", 2)[0] if module.startswith(".") else None
    return getattr(importlib.import_module(module, package), name)


@dataclass
class Worker:
    rank: int
    world: int
    device: torch.device
    control: Any = None
    conn: Any = None
    model: Any = None
    stop: threading.Event = field(default_factory=threading.Event)
    inbox: "queue.Queue" = field(default_factory=queue.Queue)
    layouts: dict = field(default_factory=dict)

    # -------------------------------------------------------------- commands

    def next_command(self):
        box = [self.inbox.get() if self.rank == 0 else None]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def reply(self, message) -> None:
        if self.rank == 0 and message is not None:
            try:
                send(self.conn, message)
            except OSError:   # the driver left; the reader thread queued the shutdown
                pass

    def load(self, spec):
        factory = resolve_factory(spec.factory, spec.sys_path)
        self.model = factory(self.device, **dict(spec.kwargs))
        cfg = self.model.config
        return ("loaded", {"config": cfg, "world": self.world, "device": str(self.device),
                           "backend": dist.get_backend()})

    def layout(self, s: int):
        """(SequenceParallel, GuidanceParallel) for sequence degree `s`, built once."""
        if s not in self.layouts:  # new_group is collective: every rank builds the same ones
            self.layouts[s] = parallel_layout(s)
        return self.layouts[s]

    def rounds(self, passes: int, mode: str, sp_options: Optional[dict] = None):
        """[(SequenceParallel, GuidanceParallel, plan indices)] for choose_rounds' schedule; all
        ranks build the same layouts in the same (round) order. sp_options: SequenceParallel
        fields (pieces, exchange) for every round's split."""
        out = []
        for s, g, indices in choose_rounds(self.world, passes, mode, self.model.config.num_heads):
            sp, gp = self.layout(s)
            if sp_options:
                sp = dataclasses.replace(sp, **sp_options)
            out.append((sp, gp, indices))
        return out

    def block_swap(self, job: WindowJob, swap: Optional[dict]) -> None:
        from ..wanvideo.block_swap import install

        model, cuda = self.model, self.device.type == "cuda"
        tokens = latent_tokens(tuple(job.y.shape), model.config.patch_size)
        parked = cuda and model.patch_embedding.weight.device.type != "cuda"
        if swap:
            kwargs = {k: v for k, v in swap.items() if k != "device"}
            kwargs.setdefault("tokens", tokens)
            install(model, device=self.device, **kwargs)
        elif cuda and (parked or model.block_streamer is not None):
            install(model, "auto", device=self.device, tokens=tokens)

    def callbacks(self, job: WindowJob) -> Optional[SamplingCallbacks]:
        if self.rank != 0:
            return None
        pending: dict = {}

        def preview(i, x0):
            pending["x0"] = x0.detach().float().cpu()

        def progress(done, total):
            if self.device.type == "cuda":   # step times seen by the driver are real
                torch.cuda.synchronize(self.device)
            send(self.conn, ("progress", done, total, pending.pop("x0", None)))

        return SamplingCallbacks(progress=progress, preview=preview if job.preview else None)

    def window(self, job: WindowJob, swap: Optional[dict], mode: str,
               sp_options: Optional[dict] = None):
        self.block_swap(job, swap)
        rounds = self.rounds(len(job.guidance.passes), mode, sp_options)
        checker = StopAgreement(self.control, self.stop if self.rank == 0 else None)
        model = self.model
        model.block_hook = checker
        runner = scheduled_runner(model, rounds, checker, len(model.blocks))
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.perf_counter()
        try:
            latents = run_window(model, job, self.device, self.callbacks(job), runner)
            checker.finish()
        except SamplingInterrupted as e:
            return ("interrupted", {"stopped_at_check": checker.checks,
                                    "seen_at_check": checker.seen_at}, str(e))
        finally:
            model.sequence_parallel, model.block_hook = None, None
        mine = {"rank": self.rank, "device": str(self.device), "seconds": time.perf_counter() - t0,
                "peak_vram_bytes": torch.cuda.max_memory_allocated(self.device)
                if self.device.type == "cuda" else None}
        every = [None] * self.world
        dist.all_gather_object(every, mine, group=self.control)
        schedule = [{"sequence": sp.world, "guidance": gp.world, "passes": list(indices)}
                    for sp, gp, indices in rounds]
        # "sequence" / "guidance": the first round's layout (the only one unless auto mixes)
        return ("done", latents.cpu(), {"ranks": every, "sequence": schedule[0]["sequence"],
                                        "guidance": schedule[0]["guidance"],
                                        "rounds": schedule})

    def release(self):
        streamer = getattr(self.model, "block_streamer", None)
        if streamer is not None and hasattr(streamer, "release"):
            streamer.release()
        return ("released",)

    def serve(self) -> None:
        while True:
            cmd = self.next_command()
            if cmd[0] == "shutdown":
                # nobody leaves before everyone has the command (a rank that exits early resets
                # the connections the others still read it from)
                dist.barrier(group=self.control)
                return
            handler = {"load": self.load, "window": self.window, "release": self.release}[cmd[0]]
            self.reply(handler(*cmd[1:]))


def _device(rank: int, local_rank: int) -> torch.device:
    names = [d for d in os.environ.get("WANVIDEO_MGPU_DEVICES", "").split(",") if d]
    if names:
        return torch.device(names[rank] if len(names) > rank else names[local_rank])
    return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")


def _watch_parent() -> None:
    """Exit when the process that started us is gone (ComfyUI killed, torchrun agent gone)."""
    parent = int(os.environ.get("WANVIDEO_MGPU_PARENT", "0")) or os.getppid()

    def watch():
        while True:
            if os.getppid() != parent:
                os._exit(1)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="wanvideo-mgpu-parent").start()


def _connect(worker: Worker) -> None:
    """Rank 0: the driver connection, and a reader thread that never blocks the compute."""
    from multiprocessing.connection import Client

    host, _, port = os.environ["WANVIDEO_MGPU_DRIVER"].rpartition(":")
    key = bytes.fromhex(os.environ["WANVIDEO_MGPU_AUTHKEY"])
    worker.conn = Client((host, int(port)), authkey=key)

    def read():
        while True:
            try:
                msg = recv(worker.conn)
            except (EOFError, OSError):
                # The driver is gone: stop the job at the next agreed block, then leave together;
                # the timer is the way out should a collective never return.
                worker.stop.set()
                worker.inbox.put(("shutdown",))
                threading.Timer(60.0, os._exit, (1,)).start()
                return
            if msg[0] == "interrupt":
                worker.stop.set()
                continue
            if msg[0] == "window":
                # here, in message order: an interrupt meant for an earlier window (it can arrive
                # after that window finished) is forgotten, one for this window is not
                worker.stop.clear()
            worker.inbox.put(msg)

    threading.Thread(target=read, daemon=True, name="wanvideo-mgpu-reader").start()


def _report(worker: Worker, text: str) -> None:
    print(f"[wanvideo multi-GPU rank {worker.rank} ({worker.device})] {text}", file=sys.stderr,
          flush=True)
    errdir = os.environ.get("WANVIDEO_MGPU_ERRDIR")
    if errdir:
        with open(os.path.join(errdir, f"rank{worker.rank}.error"), "w") as f:
            f.write(text)
    if worker.rank == 0 and worker.conn is not None:
        try:
            send(worker.conn, ("error", worker.rank, str(worker.device), text))
        except OSError:
            pass


def main() -> None:
    _watch_parent()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = _device(rank, int(os.environ.get("LOCAL_RANK", rank)))
    if os.environ.get("WANVIDEO_MGPU_THREADS"):
        torch.set_num_threads(int(os.environ["WANVIDEO_MGPU_THREADS"]))
    worker = Worker(rank, world, device)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                init_method="env://", rank=rank, world_size=world,
                                **({"device_id": device} if device.type == "cuda" else {}))
        worker.control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        if rank == 0:
            _connect(worker)
        worker.serve()
    except BaseException:
        _report(worker, traceback.format_exc())
        sys.stderr.flush()
        os._exit(ERROR_EXIT)
    dist.destroy_process_group()
