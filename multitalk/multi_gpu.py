"""The multi-GPU runtime, driver side: worker processes that share each window's denoising.

    pool = WorkerPool(ModelSpec(...), Placement.parse("0,1")).start()
    latents = pool.sample_window(job, callbacks)     # a multitalk.window_job.WindowJob
    pool.shutdown()

The driver (the ComfyUI process, a test, a benchmark) is never a rank: it starts one worker per
device (`python -m wanvideo.multi_gpu_worker`, see multi_gpu_worker.py), the workers form a
torch.distributed group among themselves (NCCL on GPUs, gloo on the CPU) and every worker loads
the model itself from the same ModelSpec. The driver talks only to rank 0, over one
multiprocessing.connection (standard-library IPC, authenticated); rank 0 hands every command to
the other ranks with broadcast_object_list. So the driver keeps serving whatever the workers do,
and a worker that dies is noticed here (process liveness) instead of hanging a collective here.

Under torchrun (several hosts) nobody here starts processes: `WorkerPool(..., launch=False,
listen=(host, port), authkey=...)` waits for rank 0 to connect (docs/MULTI_GPU.md).

Failure rules: an interrupt (callbacks.should_stop) is passed to rank 0, which agrees it with
every rank at the next block boundary; the job ends as SamplingInterrupted and the workers stay.
Any other failure (a rank's exception, a dead or killed rank, a lost connection) stops every
worker and raises WorkerError naming the rank and device; the next pool starts fresh workers.
"""
from __future__ import annotations

import io
import logging
import os
import pickle
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Listener
from typing import Optional

import torch

from ..wanvideo.peer_copy import TRANSPORTS
from ..wanvideo.sampling import SamplingCallbacks, SamplingInterrupted
from .window_job import WindowJob

log = logging.getLogger(__name__)

MODES = ("auto", "sequence", "guidance")
START_TIMEOUT_S = 120.0       # workers started -> rank 0 connected (model loading comes after)
STOP_TIMEOUT_S = 10.0
MAX_CPU_WORKERS = 4


# The name this process imported the pack under: ComfyUI names it after its folder path, the
# workers (and tests) `wanvideo_infinitetalk`. Pickled classes carry that name.
_PACK = __name__.rsplit(".", 2)[0]


class _PackUnpickler(pickle.Unpickler):
    """Reads classes of the sender's pack (e.g. WindowJob) as this process's pack classes."""

    def __init__(self, data: bytes, sender: str):
        super().__init__(io.BytesIO(data))
        self.sender = sender

    def find_class(self, module, name):
        if module == self.sender or module.startswith(self.sender + "."):
            module = _PACK + module[len(self.sender):]
        return super().find_class(module, name)


def send(conn, message) -> None:
    """Plain pickle, not multiprocessing's: torch registers shared-memory reductions with the
    latter, which only work between processes of one multiprocessing family; tensors here are
    copied as bytes. The sender's pack name travels along (see _PackUnpickler)."""
    payload = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    conn.send_bytes(pickle.dumps((_PACK, payload), protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn):
    sender, payload = pickle.loads(conn.recv_bytes())
    return _PackUnpickler(payload, sender).load()


class WorkerError(RuntimeError):
    """A worker failed or died; every worker of the pool has been stopped."""


@dataclass(frozen=True)
class ModelSpec:
    """How every worker builds its copy of the model: factory(device, **kwargs) -> model.

    factory: "module:function"; a module starting with "." is inside the pack
    (".multitalk.multi_gpu_worker:load_checkpoint" loads a checkpoint file like the loader
    node); others are imported after prepending `sys_path` (tests, benchmarks)."""

    factory: str
    kwargs: tuple = ()            # sorted (name, value) pairs: hashable, so a pool can be reused
    sys_path: tuple = ()

    @classmethod
    def make(cls, factory: str, sys_path=(), **kwargs) -> "ModelSpec":
        return cls(factory, tuple(sorted(kwargs.items())), tuple(sys_path))


@dataclass(frozen=True)
class Placement:
    """Devices of the workers (one per rank, in rank order) and the default split mode."""

    devices: tuple
    mode: str = "auto"

    @property
    def backend(self) -> str:
        return "nccl" if self.devices[0].startswith("cuda") else "gloo"

    @property
    def world(self) -> int:
        return len(self.devices)

    @classmethod
    def parse(cls, gpus: str, mode: str = "auto", cuda_count: Optional[int] = None) -> "Placement":
        """gpus: "all", "0,1" (CUDA indices), or "cpu:N" (N CPU processes over gloo: tests)."""
        if mode not in MODES:
            raise ValueError(f"multi-GPU mode {mode!r} is not one of {MODES}")
        text = str(gpus).strip().lower().replace(" ", "")
        if text.startswith("cpu"):
            count = text.split(":", 1)[1] if ":" in text else "2"
            n = int(count) if count.isdigit() else 0
            if not 1 <= n <= MAX_CPU_WORKERS:   # a test mode: no prompt may fork a crowd
                raise ValueError(f"gpus {gpus!r}: cpu:N takes 1..{MAX_CPU_WORKERS} processes")
            return cls(tuple(["cpu"] * n), mode)
        count = torch.cuda.device_count() if cuda_count is None else cuda_count
        if text == "all":
            ids = list(range(count))
        else:
            try:
                ids = [int(p) for p in text.split(",") if p != ""]
            except ValueError:
                raise ValueError(f"gpus {gpus!r}: expected 'all', GPU indices like '0,1' or "
                                 "'cpu:2'") from None
        bad = [i for i in ids if not 0 <= i < count]
        if bad or len(set(ids)) != len(ids):
            raise ValueError(f"gpus {gpus!r}: this machine has {count} CUDA device(s) "
                             f"(0..{count - 1}); each may be named once")
        if not ids:
            raise ValueError(f"gpus {gpus!r} names no device" if count else
                             f"gpus {gpus!r}: no CUDA device is visible to this process")
        return cls(tuple(f"cuda:{i}" for i in ids), mode)


@dataclass
class _Worker:
    rank: int
    device: str
    process: Optional[subprocess.Popen] = None

    def exit_text(self) -> str:
        code = self.process.poll() if self.process is not None else None
        if code is None:
            return "is running"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


def _drain(conn, timeout: float) -> None:
    """Read until the other side closes (EOFError) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if conn.poll(0.05):
            conn.recv_bytes()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pack_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class WorkerPool:
    spec: ModelSpec
    placement: Placement
    launch: bool = True                    # False: workers come from torchrun (listen below)
    listen: tuple = ("127.0.0.1", 0)
    authkey: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    threads: Optional[int] = None          # CPU threads per worker (CPU ranks; default: share)
    info: dict = field(default_factory=dict)   # what rank 0 reported after loading

    def __post_init__(self):
        self._workers: list[_Worker] = []
        self._conn = None
        self._listener = None
        self._errdir = None
        self._lock = threading.Lock()
        self.closed = False

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "WorkerPool":
        self._listener = Listener(self.listen, authkey=self.authkey)
        self._errdir = tempfile.mkdtemp(prefix="wanvideo_mgpu_")
        try:
            if self.launch:
                self._spawn()
            self._conn = self._accept()
            reply = self._exchange(("load", self.spec), what="loading the model")
            self.info = dict(reply[1])
        except BaseException:
            self._kill_all()
            raise
        log.info("WanVideo multi-GPU: %d worker(s) on %s (%s) ready", self.placement.world,
                 ", ".join(self.placement.devices), self.placement.backend)
        return self

    def _worker_env(self, rank: int, port: int) -> dict:
        env = dict(os.environ)
        world = self.placement.world
        env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                   LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   WANVIDEO_MGPU_DRIVER="%s:%d" % self._listener.address,
                   WANVIDEO_MGPU_AUTHKEY=self.authkey.hex(),
                   WANVIDEO_MGPU_DEVICES=",".join(self.placement.devices),
                   WANVIDEO_MGPU_ERRDIR=self._errdir,
                   WANVIDEO_MGPU_PARENT=str(os.getpid()))
        if self.placement.backend == "gloo":
            threads = self.threads or max(1, (os.cpu_count() or 1) // world)
            env.update(OMP_NUM_THREADS=str(threads), WANVIDEO_MGPU_THREADS=str(threads))
        return env

    def _spawn(self) -> None:
        port = _free_port()
        cmd = [sys.executable, "-m", "wanvideo.multi_gpu_worker"]
        for rank, device in enumerate(self.placement.devices):
            proc = subprocess.Popen(cmd, cwd=_pack_root(), env=self._worker_env(rank, port),
                                    stdin=subprocess.DEVNULL)
            self._workers.append(_Worker(rank, device, proc))

    def _accept(self):
        """Rank 0's connection; fails early when a worker dies during start-up."""
        box: dict = {}

        def accept():
            try:
                box["conn"] = self._listener.accept()
            except Exception as e:  # closed listener or a failed handshake
                box["error"] = e

        t = threading.Thread(target=accept, daemon=True, name="wanvideo-mgpu-accept")
        t.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while t.is_alive():
            t.join(0.05)
            self._raise_if_dead("while starting")
            if self.launch and time.monotonic() > deadline:
                raise WorkerError("multi-GPU workers did not connect within "
                                  f"{START_TIMEOUT_S:.0f} s")
        if "conn" not in box:
            raise WorkerError(f"multi-GPU rank 0 could not connect: {box.get('error')}")
        return box["conn"]

    def shutdown(self) -> None:
        """Ask the workers to exit; kill whatever is left after STOP_TIMEOUT_S."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
        try:
            if self._conn is not None:
                send(self._conn, ("shutdown",))
                if not self.launch:   # torchrun: wait for rank 0 to hang up (it is leaving)
                    _drain(self._conn, STOP_TIMEOUT_S)
        except (OSError, EOFError, ValueError):
            pass
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self._workers:
            try:
                w.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill_all()

    def _kill_all(self) -> None:
        self.closed = True
        for w in self._workers:
            if w.process.poll() is None:
                w.process.kill()
        for w in self._workers:
            try:
                w.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("multi-GPU worker rank %d (pid %d) did not exit after SIGKILL",
                          w.rank, w.process.pid)
        for closable in (self._conn, self._listener):
            try:
                if closable is not None:
                    closable.close()
            except OSError:
                pass
        if self._errdir:
            import shutil

            shutil.rmtree(self._errdir, ignore_errors=True)
            self._errdir = None

    @property
    def alive(self) -> bool:
        return not self.closed and all(w.process.poll() is None for w in self._workers)

    def pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    # ------------------------------------------------------------------ jobs

    def sample_window(self, job: WindowJob, callbacks: Optional[SamplingCallbacks] = None,
                      block_swap: Optional[dict] = None, mode: Optional[str] = None,
                      sp_options: Optional[dict] = None) -> torch.Tensor:
        """Denoise one window on the workers; latents (fp32, host). block_swap: keywords of
        wanvideo.block_swap.install applied on every worker (None: their default); mode: the
        split for this window (default: the placement's); sp_options: fields of
        sequence_parallel.SequenceParallel for the split forwards, "pieces" (head pieces of the
        overlapped all-to-all), "exchange" (heads / keys) and "transport" (auto / send_recv /
        copy_engine); None: their defaults."""
        mode = mode or self.placement.mode
        if mode not in MODES:
            raise ValueError(f"multi-GPU mode {mode!r} is not one of {MODES}")
        unknown = set(sp_options or {}) - {"pieces", "exchange", "transport"}
        if unknown:
            raise ValueError(f"sp_options {sorted(unknown)} are not SequenceParallel options "
                             "(pieces, exchange, transport)")
        transport = (sp_options or {}).get("transport", "auto")
        if transport not in TRANSPORTS:   # refused here, not as a worker's traceback
            raise ValueError(f"multi-GPU transport {transport!r} is not one of {TRANSPORTS}")
        cb = callbacks or SamplingCallbacks()
        job = job.to_host()
        job.preview = cb.preview is not None
        reply = self._exchange(("window", job, block_swap, mode, sp_options), cb,
                               what=job.label or "a window")
        if reply[0] == "interrupted":
            self.info["last_stats"] = dict(reply[1])
            raise SamplingInterrupted(-1, f"multi-GPU, {reply[2]}")
        stats = self.info["last_stats"] = reply[2]
        peaks = [r["peak_vram_bytes"] for r in stats["ranks"]]
        log.info("WanVideo multi-GPU %s: %s%s", job.label or "window", describe_rounds(stats),
                 "" if None in peaks else
                 ", peak VRAM " + " / ".join(f"{p / 2 ** 30:.1f}" for p in peaks) + " GiB")
        return reply[1]

    def release(self) -> None:
        """Free the workers' per-run device memory (BlockSwap slots); the model stays."""
        if self.alive:
            self._exchange(("release",), what="releasing device memory")

    def _exchange(self, message, callbacks: Optional[SamplingCallbacks] = None, what: str = ""):
        if self.closed:
            raise WorkerError("the multi-GPU workers were stopped; start a new pool")
        try:
            send(self._conn, message)
        except (OSError, EOFError, ValueError):
            self._fail(what, "the connection to rank 0 is lost")
        asked_stop = False
        while True:
            self._raise_if_dead(what)
            try:
                ready = self._conn.poll(0.05)
                reply = recv(self._conn) if ready else None
            except (OSError, EOFError):
                self._fail(what, "the connection to rank 0 is lost")
            if reply is None:
                if not asked_stop and callbacks is not None and callbacks.should_stop \
                        and callbacks.should_stop():
                    send(self._conn, ("interrupt",))
                    asked_stop = True
                continue
            if reply[0] == "progress":
                _, done, total, x0 = reply
                if x0 is not None and callbacks is not None and callbacks.preview is not None:
                    callbacks.preview(done - 1, x0)
                if callbacks is not None and callbacks.progress is not None:
                    callbacks.progress(done, total)
            elif reply[0] == "error":
                self._fail(what, f"rank {reply[1]} ({reply[2]}) failed:\n{reply[3]}")
            else:
                return reply

    # ------------------------------------------------------------------ failures

    def _dead(self) -> Optional[_Worker]:
        return next((w for w in self._workers if w.process.poll() is not None), None)

    def _raise_if_dead(self, what: str) -> None:
        dead = self._dead()
        if dead is not None and not self.closed:
            self._fail(what, None)

    def _rank_error(self, rank: int) -> str:
        path = os.path.join(self._errdir or "", f"rank{rank}.error")
        try:
            with open(path) as f:
                return f.read().strip()
        except OSError:
            return ""

    def _culprit(self, reported: bool) -> Optional[_Worker]:
        """The rank to blame: one that left an error file, else a dead rank other than 0 (rank 0
        usually fails because another rank vanished from a collective), else rank 0."""
        dead = [w for w in self._workers if w.process.poll() is not None]
        for w in dead:
            if self._rank_error(w.rank):
                return w
        others = [w for w in dead if w.rank != 0]
        if others:
            return others[0]
        return None if reported else (dead[0] if dead else None)

    def _fail(self, what: str, reason: Optional[str]):
        """Name the cause, stop every worker, raise WorkerError."""
        deadline = time.monotonic() + (1.0 if reason is not None and self.launch else 0.0)
        culprit = self._culprit(reason is not None)
        while culprit is None and time.monotonic() < deadline:
            time.sleep(0.05)
            culprit = self._culprit(True)
        if culprit is not None:
            detail = self._rank_error(culprit.rank)
            reason = (f"worker rank {culprit.rank} ({culprit.device}) {culprit.exit_text()}"
                      + (f":\n{detail}" if detail else ""))
        self._kill_all()
        raise WorkerError(f"multi-GPU sampling failed while {what or 'working'}: {reason}. "
                          "Every worker was stopped; the next run starts new ones.")


_SHARED: dict = {}


def describe_rounds(stats: dict) -> str:
    """The step's split for the log: 'sequence 2 x guidance 1', or with rounds
    'passes 1-2: sequence 1 x guidance 2, then pass 3: sequence 2 x guidance 1'."""
    rounds = stats.get("rounds") or [dict(stats, passes=None)]
    if len(rounds) == 1:
        return f"sequence {rounds[0]['sequence']} x guidance {rounds[0]['guidance']}"

    def passes(r):
        p = [i + 1 for i in r["passes"]]
        return f"pass {p[0]}" if len(p) == 1 else f"passes {p[0]}-{p[-1]}"

    return ", then ".join(f"{passes(r)}: sequence {r['sequence']} x guidance {r['guidance']}"
                          for r in rounds)


def shared_pool(spec: ModelSpec, placement: Placement, **options) -> WorkerPool:
    """The one pool this process keeps between runs (models stay loaded): reused while its
    workers live and the spec and devices match, otherwise the old one is stopped first (two
    pools would load the model twice on the same GPUs)."""
    import atexit

    pool = _SHARED.get("pool")
    if pool is not None and pool.alive and pool.spec == spec \
            and pool.placement.devices == placement.devices:   # the mode is per window
        return pool
    shutdown_shared()
    if not _SHARED.get("atexit"):
        atexit.register(shutdown_shared)
        _SHARED["atexit"] = True
    pool = WorkerPool(spec, placement, **options).start()
    _SHARED["pool"] = pool
    return pool


def current_pool() -> Optional[WorkerPool]:
    pool = _SHARED.get("pool")
    return pool if pool is not None and pool.alive else None


def shutdown_shared(spec: Optional[ModelSpec] = None) -> None:
    """Stop the kept pool (only when it serves `spec`, if given)."""
    pool = _SHARED.get("pool")
    if pool is None or (spec is not None and pool.spec != spec):
        return
    _SHARED.pop("pool", None)
    pool.shutdown()
