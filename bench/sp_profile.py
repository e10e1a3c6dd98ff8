"""Where the time goes when Wan blocks run sequence parallel (Ulysses) on N GPUs versus one.

    python bench/sp_profile.py --out sp_profile.json     # 2 GPUs (NCCL), 4 14B-shaped fp8 blocks
    python bench/sp_profile.py --device cpu --blocks 2 --dim 256 --ffn 512 --frames 9 \
        --size 64x64 --quant none --dtype fp32            # CPU smoke test (gloo)

Run time on 2x H200 with the defaults: about 1-1.5 min (process start + CUDA/NCCL init ~15 s,
building 4 fp8 blocks ~10 s, Triton compiles ~10-20 s, then ~15 forwards of ~0.3 s per phase
and the profiler's post-processing, a few seconds each).

Every rank (`--world`, spawned) builds the same random-weight 14B-shaped model (bench/common,
same seed, weights resident on its GPU) and the same inputs: one forward of the full model at
t = 700, one speaker, an 832x480x81 window (32,760 tokens). Phase "single": rank 0 alone
(model.sequence_parallel None) while the others wait on a host barrier. Phase "split": all ranks
(SequenceParallel.from_group()). Each phase: warm-up forwards, timed forwards (CUDA events; the
blocks are also timed alone, from hooks on the first and last block), then one forward under
torch.profiler. From the profile: device time summed by category (nccl, attention, gemm, copy,
triton, other), the top kernels, kernel launches, and the device's busy time against the
profiled forward's span (idle fraction) and the time in which only NCCL kernels ran (exposed
communication). On the CPU (gloo) there is no device activity: CPU op self time is categorized
instead. `overhead` compares split with single / world per block, in total and per category.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build, emit, forbid_multicast  # noqa: E402  (also loads the pack)

from wanvideo_infinitetalk.multitalk.audio_proj import AudioInput  # noqa: E402
from wanvideo_infinitetalk.wanvideo.sequence_parallel import SequenceParallel  # noqa: E402

# The pack's Triton kernels (fused_ops, quant_kernels, attention_int8_kernels), by kernel name.
TRITON = ("amax_scale", "scale_cast_rows", "rms_rope", "layer_norm")
# First match wins (lower-cased substrings; TRITON names match the start of a kernel name).
CUDA_CATEGORIES = (("nccl", ("nccl",)),
                   ("attention", ("flash", "fmha", "sdpa", "attention", "attn", "cudnn",
                                  "_quant_kv_kernel")),
                   ("triton", ("triton",)),
                   ("gemm", ("gemm", "cutlass", "xmma", "scaled_mm", "cublas", "nvjet")),
                   ("copy", ("memcpy", "memset", "copy", "catarray")))
CPU_CATEGORIES = (("nccl", ("gloo", "c10d", "nccl", "all_to_all", "allreduce", "all_reduce",
                            "allgather", "all_gather")),
                  ("attention", ("attention", "flash", "sdpa")),
                  ("triton", ("triton",)),
                  ("gemm", ("mm", "linear", "matmul")),
                  ("copy", ("copy", "aten::cat", "clone", "contiguous", "memcpy", "memset")))
CATEGORIES = [c for c, _ in CUDA_CATEGORIES] + ["other"]


def category(name: str, cuda: bool) -> str:
    low = name.lower()
    if cuda and low.startswith(TRITON):
        return "triton"
    for cat, keys in CUDA_CATEGORIES if cuda else CPU_CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def union_us(spans) -> float:
    """Length of the union of (start, end) intervals."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(prof, cuda: bool, wall_ms: float, top: int) -> dict:
    """Device kernels (CUDA) or CPU ops' self time (CPU) of one profiled forward, by category."""
    events = prof.events()
    if cuda:
        items = [(e.name, e.time_range.elapsed_us(), (e.time_range.start, e.time_range.end))
                 for e in events if e.device_type == DeviceType.CUDA]
    else:
        items = [(e.name, e.self_cpu_time_total, None) for e in events
                 if e.device_type == DeviceType.CPU and not e.is_async]
    cats = dict.fromkeys(CATEGORIES, 0.0)
    counts = dict.fromkeys(CATEGORIES, 0)
    names: dict[str, list] = {}
    for name, us, _ in items:
        c = category(name, cuda)
        cats[c] += us / 1e3
        counts[c] += 1
        row = names.setdefault(name, [0.0, 0])
        row[0] += us / 1e3
        row[1] += 1
    out = {"unit": "device ms" if cuda else "cpu self ms", "wall_ms": wall_ms,
           "categories_ms": cats, "category_counts": counts, "events": len(items),
           "top": [{"name": n[:140], "ms": ms, "count": k, "category": category(n, cuda)}
                   for n, (ms, k) in sorted(names.items(), key=lambda kv: -kv[1][0])[:top]]}
    launches = [e for e in events if e.device_type == DeviceType.CPU and "LaunchKernel" in e.name]
    out["kernel_launches"] = len(launches)
    if cuda and items:
        spans = [s for _, _, s in items]
        span = max(b for _, b in spans) - min(a for a, _ in spans)
        busy = union_us(spans)
        compute = union_us([s for n, _, s in items if category(n, cuda) != "nccl"])
        out.update(kernel_sum_ms=sum(us for _, us, _ in items) / 1e3, busy_ms=busy / 1e3,
                   span_ms=span / 1e3, idle_fraction=1 - busy / span if span else None,
                   idle_fraction_of_wall=1 - busy / 1e3 / wall_ms if wall_ms else None,
                   nccl_exposed_ms=(busy - compute) / 1e3)
    return out


class Clock:
    """Marks on the GPU timeline (CUDA events) or the host clock; ms between two marks."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def ms(self, a, b) -> float:
        if not self.cuda:
            return (b - a) * 1e3
        torch.cuda.synchronize()
        return a.elapsed_time(b)

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()


def measure(model, inp: dict, args, clock: Clock, barrier, profiled: bool = True,
            trace: Optional[str] = None, settle: bool = False):
    """Warm-up, timed forwards (whole forward and blocks alone), one profiled forward.
    `settle`: every rank waits for its GPU and the others between timed forwards (the block
    times then start with the host far less ahead of the GPU)."""
    blocks = len(model.blocks)
    marks = []
    with torch.no_grad():
        for _ in range(args.warmup):
            out = model(**inp)
        clock.sync()
        barrier()
        hooks = [model.blocks[0].register_forward_pre_hook(lambda *a: marks.append(clock.mark())),
                 model.blocks[-1].register_forward_hook(lambda *a: marks.append(clock.mark()))]
        start = clock.mark()
        for _ in range(args.iters):
            out = model(**inp)
            if settle:
                clock.sync()
                barrier()
        end = clock.mark()
        for h in hooks:
            h.remove()
        forward = clock.ms(start, end) / args.iters
        block_ms = sum(clock.ms(a, b) for a, b in zip(marks[::2], marks[1::2])) / args.iters
        res = {"ms_per_forward": forward, "blocks_ms": block_ms, "ms_per_block": block_ms / blocks,
               "forward_ms_per_block": forward / blocks}
        if profiled:
            barrier()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if clock.cuda else [])
            with profile(activities=acts) as prof:
                t0 = time.perf_counter()
                out = model(**inp)
                clock.sync()
                wall = (time.perf_counter() - t0) * 1e3
            res["profile"] = summarize(prof, clock.cuda, wall, args.top)
            if trace:
                prof.export_chrome_trace(trace)
    return res, out.float().cpu().clone()


def make_inputs(args, device, dtype) -> dict:
    w, h = (int(v) for v in args.size.split("x"))
    f_lat = (args.frames - 1) // 4 + 1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, f_lat, h // 8, w // 8, generator=g)
    y = torch.randn(1, 20, f_lat, h // 8, w // 8, generator=g)
    clip = torch.randn(1, 257, 1280, generator=g)
    text = torch.randn(1, 512, 4096, generator=g)
    audio = torch.randn(1, args.frames, 5, 12, 768, generator=g)
    return dict(x=x.to(device), t=torch.tensor([700.0], device=device),
                context=text.to(device, dtype), clip_fea=clip.to(device, dtype), y=y.to(device),
                audio=AudioInput(audio.to(device)))


def worker(rank: int, args, port: int, out_dir: str) -> None:
    cuda = args.device == "cuda"
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)   # the same kernels and reduction order in every process
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=args.world,
                            **({"device_id": device} if cuda else {}))
    try:
        host = dist.new_group(backend="gloo") if cuda else None   # barriers that wait on the host

        def barrier():
            dist.barrier(group=host)

        model = build(args.blocks, args.quant, args.dim, args.ffn, device=str(device),
                      storage=str(device), seed=0)
        if args.dtype == "fp32":
            model.float()
            model.compute_dtype = torch.float32
        model.set_attention(args.attention)
        inp, clock, res = make_inputs(args, device, model.dtype), Clock(cuda), {}
        if rank == 0:
            res["single"], want = measure(model, inp, args, clock, lambda: None)
        barrier()
        model.sequence_parallel = sp = SequenceParallel.from_group(
            exchange=args.exchange, transport=args.transport)
        trace = os.path.join(out_dir, f"trace_rank{rank}.json") if args.trace else None
        res["split"], got = measure(model, inp, args, clock, barrier, trace=trace)
        res["split"]["pieces"] = sp.pieces_for(model.config.num_heads)
        res["split"]["exchange"] = args.exchange
        res["split"]["transport"] = args.transport
        res["by_pieces"] = {}   # the head exchange (Ulysses) at each extra piece count
        for p in args.pieces:
            model.sequence_parallel = SequenceParallel.from_group(pieces=p, exchange="heads",
                                                                  transport=args.transport)
            res["by_pieces"][str(p)] = measure(model, inp, args, clock, barrier, profiled=False)[0]
        res["by_transport"] = {}   # the head exchange over each other transport, same pieces
        for t in args.transports:
            model.sequence_parallel = SequenceParallel.from_group(exchange="heads", transport=t)
            timing, other = measure(model, inp, args, clock, barrier, profiled=False)
            res["by_transport"][t] = dict(timing, rel_l2_vs_split=float(
                (other.double() - got.double()).norm() / got.double().norm()))
        if args.diagnose:
            res["diagnose"] = diagnose(model, inp, args, clock, barrier)
            model.sequence_parallel = None
            if rank == 0:   # the single GPU again: how far its clocks moved during the run
                res["single_after"] = measure(model, inp, args, clock, lambda: None,
                                              profiled=False)[0]
            barrier()
        if rank == 0:
            got, want = got.double(), want.double()
            res["correctness"] = {"rel_max": float((got - want).abs().max() / want.abs().max()),
                                  "rel_l2": float((got - want).norm() / want.norm())}
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(res, f)
        barrier()
    finally:
        dist.destroy_process_group()


def diagnose(model, inp: dict, args, clock: Clock, barrier) -> dict:
    """Split timings with parts of the communication switched off (wrong outputs, timing only):
    the fp8 scale agreement (each rank keeps its own scales), the attention exchange (each rank
    attends over whatever its receive buffers hold), and both: the split's compute floor; the
    full split over send/recv; and `settled`, the full split with the ranks realigned between
    forwards."""
    from unittest import mock

    from wanvideo_infinitetalk.wanvideo import peer_copy, quant_kernels

    model.sequence_parallel = SequenceParallel.from_group(transport=args.transport)

    def own_scales():
        return mock.patch.object(quant_kernels, "agree_scale", lambda scale: scale)

    def no_exchange():
        stack = contextlib.ExitStack()
        for cls in (peer_copy.CopyEngineLink, peer_copy.SendRecvLink):
            stack.enter_context(mock.patch.object(cls, "start", lambda *a, **k: None))
            stack.enter_context(mock.patch.object(cls, "wait", lambda *a: None))
        return stack

    @contextlib.contextmanager
    def send_recv():
        model.sequence_parallel = SequenceParallel.from_group(transport="send_recv")
        try:
            yield
        finally:
            model.sequence_parallel = SequenceParallel.from_group(transport=args.transport)

    variants = {"full": [], "send_recv": [send_recv], "no_scale_agreement": [own_scales],
                "no_exchange": [no_exchange], "neither": [own_scales, no_exchange]}
    # Interleaved rounds: the GPUs' clocks drift over a run, so variants timed one after the
    # other would differ by when they ran.
    rows: dict = {name: [] for name in variants}
    for _ in range(args.diagnose_rounds):
        for name, patches in variants.items():
            with contextlib.ExitStack() as stack:
                for patch in patches:
                    stack.enter_context(patch() if callable(patch) else patch)
                rows[name].append(measure(model, inp, args, clock, barrier, profiled=False)[0])
    out = {name: {"ms_per_block": [r["ms_per_block"] for r in rs],
                  "median_ms_per_block": statistics.median(r["ms_per_block"] for r in rs)}
           for name, rs in rows.items()}
    out["settled"] = measure(model, inp, args, clock, barrier, profiled=False, settle=True)[0]
    return out


def overhead(single: dict, split: dict, world: int, blocks: int) -> dict:
    """Split minus single / world, per block: the time that splitting did not remove."""
    a, b = single["profile"]["categories_ms"], split["profile"]["categories_ms"]
    return {"ms_per_block": split["ms_per_block"] - single["ms_per_block"] / world,
            "ideal_ms_per_block": single["ms_per_block"] / world,
            "by_category_ms_per_block": {c: (b[c] - a[c] / world) / blocks for c in a}}


def rank_row(rank: int, split: dict) -> dict:
    """One rank's split timing: a rank that waits on the other shows it as NCCL time."""
    prof = split["profile"]
    return {"rank": rank, "ms_per_forward": split["ms_per_forward"],
            "ms_per_block": split["ms_per_block"], "categories_ms": prof["categories_ms"],
            "nccl_exposed_ms": prof.get("nccl_exposed_ms")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--dim", type=int, default=5120)
    p.add_argument("--ffn", type=int, default=13824)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--size", default="832x480", help="WxH in pixels")
    p.add_argument("--quant", default="fp8_e4m3fn_scaled", help="as common.build; none = bf16")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"),
                   help="fp32 (with --quant none) for an exact CPU comparison")
    p.add_argument("--attention", default="sdpa", help="the model's attention backend")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--exchange", default="heads", choices=("heads", "keys"),
                   help="how the profiled split forward exchanges attention inputs")
    p.add_argument("--transport", default="auto", choices=("auto", "send_recv", "copy_engine"),
                   help="how the profiled split forward moves the exchanged bytes")
    p.add_argument("--transports", default="",
                   help="comma list of transports to time besides, with the head exchange")
    p.add_argument("--trace", action="store_true",
                   help="also write each rank's profiled split forward as a Chrome trace")
    p.add_argument("--diagnose", action="store_true",
                   help="also time the split without scale agreement / exchange (diagnose)")
    p.add_argument("--diagnose-rounds", type=int, default=3)
    p.add_argument("--pieces", default="",
                   help="comma list of extra head-piece counts to time with the head exchange")
    args = p.parse_args(argv)
    args.pieces = [int(v) for v in args.pieces.split(",") if v.strip()]
    args.transports = [v.strip() for v in args.transports.split(",") if v.strip()]
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    forbid_multicast()  # the workers inherit it
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(worker, args=(args, free_port(), tmp), nprocs=args.world, join=True,
                           start_method="spawn")
        ranks = [json.load(open(os.path.join(tmp, f"rank{r}.json"))) for r in range(args.world)]
        if args.trace and args.out:
            for r in range(args.world):
                shutil.copy(os.path.join(tmp, f"trace_rank{r}.json"),
                            f"{os.path.splitext(args.out)[0]}_trace_rank{r}.json")
    w, h = (int(v) for v in args.size.split("x"))
    f_lat = (args.frames - 1) // 4 + 1
    r0 = ranks[0]
    result = {
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        "torch": torch.__version__, "world": args.world,
        "model": f"{args.blocks} blocks dim {args.dim} ffn {args.ffn}, {args.quant}, {args.dtype}",
        "window": f"{w}x{h}x{args.frames}", "tokens": f_lat * (h // 16) * (w // 16),
        "attention": args.attention, "warmup": args.warmup, "iters": args.iters,
        "single": r0["single"], "split": r0["split"],
        "overhead": overhead(r0["single"], r0["split"], args.world, args.blocks),
        "split_ranks": [rank_row(i, r["split"]) for i, r in enumerate(ranks)],
        "by_pieces": r0["by_pieces"], "by_transport": r0["by_transport"],
        "diagnose": r0.get("diagnose"), "single_after": r0.get("single_after"),
        "correctness": r0["correctness"],
        "run_s": time.perf_counter() - t0}
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
