"""Multi-GPU benchmark: one InfiniteTalk window on 1 GPU and on 2 GPUs through the pack's runtime.

    python bench/multigpu.py --out multigpu.json            # 2 GPUs, 14B-shaped fp8, ~4-5 min
    python bench/multigpu.py --tiny --device cpu --out x.json   # CPU smoke test (gloo, tiny)
    python bench/multigpu.py --fp8-dynamic tensor --out t.json  # the per-tensor form (older)

Each worker of multitalk.multi_gpu.WorkerPool builds the same 14B-shaped Wan2.1 I2V + InfiniteTalk
model from random weights (bench/common.build, same seed, so every GPU holds the same weights),
quantized to fp8 (scaled). Both pools start at once (their builds overlap); then, setting by
setting, the 1-GPU pool and right after it the 2-GPU pool (each `--sp` variant) denoise one
81-frame 832x480 window (32,760 tokens) in four settings: BlockSwap with every block streamed, or
every block resident; one pass per step (guidance 1/1) or three (5/4). The split is the runtime's
auto choice: 1 pass split over both GPUs (sequence parallel); 3 passes in rounds, 2 side by side
then 1 split over both ("rounds" in each result). Step times are taken by the driver when rank 0
reports a finished step (rank 0 synchronises its GPU first); the first step is warm-up, the median
of the others is reported. Peak VRAM per GPU is torch.cuda.max_memory_allocated in each worker
for that window (the copy-engine exchange's symmetric workspace is outside it, see
wanvideo/peer_copy.py).
`--sp keys,heads:2,heads:1` times the 2-GPU pool once per way of exchanging the split attention's
inputs (wanvideo/sequence_parallel.py: `keys` sends keys and values and merges partial attention;
`heads:N` is the Ulysses all-to-all cut into N overlapped head pieces, 1 = nothing overlapped;
`heads` alone is the runtime's default; a suffix `@send_recv` / `@copy_engine` picks how the bytes
move, wanvideo/peer_copy.py), all against the same 1-GPU run; the first is the headline.
The 2-GPU latents are compared with the 1-GPU ones (relative L2 and max-abs / max).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time

import torch

from common import build, emit, forbid_multicast  # noqa: E402  (also loads the pack)

from wanvideo_infinitetalk.multitalk.audio_proj import AudioInput  # noqa: E402
from wanvideo_infinitetalk.multitalk.multi_gpu import ModelSpec, Placement, WorkerPool  # noqa: E402
from wanvideo_infinitetalk.multitalk.window_job import WindowJob  # noqa: E402
from wanvideo_infinitetalk.wanvideo import quant_linear  # noqa: E402
from wanvideo_infinitetalk.wanvideo.sampling import SamplingCallbacks  # noqa: E402
from wanvideo_infinitetalk.wanvideo.schedules import flow_sigmas  # noqa: E402

BENCH = os.path.dirname(os.path.abspath(__file__))
TARGETS = {"one_pass_speedup": 1.85, "three_pass_speedup": 1.9, "rel_err": 2e-2}


def worker_model(device, blocks: int, dim: int, ffn: int, quant: str, seed: int,
                 fp8_dynamic: str | None = None):
    """The workers' factory (ModelSpec): weights stored in host RAM, placed by BlockSwap.
    `fp8_dynamic`: "rows" / "tensor" sets quant_linear.DYNAMIC_ROWS in this worker (every
    dynamic fp8 input per row, or per tensor where no kernel writes rows); None: the default."""
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(device)
    if fp8_dynamic is not None:
        quant_linear.DYNAMIC_ROWS = fp8_dynamic == "rows"
    return build(blocks, quant, dim, ffn, device=str(device), storage="cpu", seed=seed)


def make_job(frames: int, width: int, height: int, steps: int, passes: int) -> WindowJob:
    f_lat, h, w = (frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator().manual_seed(0)
    text, audio = (5.0, 4.0) if passes == 3 else (1.0, 1.0)
    y = torch.randn(1, 20, f_lat, h, w, generator=g)
    return WindowJob(
        noise=torch.randn(1, 16, f_lat, h, w, generator=g), sigmas=flow_sigmas(steps, 5.0),
        solver="euler", text_scale=text, audio_scale=audio, motion=y[:, 4:, :1].clone(), y=y,
        clip_fea=torch.randn(1, 257, 1280, generator=g),
        positive=torch.randn(1, 512, 4096, generator=g),
        negative=torch.randn(1, 512, 4096, generator=g),
        audio=AudioInput(torch.randn(1, frames, 5, 12, 768, generator=g)),
        label=f"{passes}-pass window")


def sp_options(variant: str) -> dict:
    """'keys' / 'heads' / 'heads:2' / 'heads:2@send_recv' -> SequenceParallel fields."""
    variant, _, transport = variant.partition("@")
    exchange, _, pieces = variant.partition(":")
    return {"exchange": exchange, **({"pieces": int(pieces)} if pieces else {}),
            **({"transport": transport} if transport else {})}


def run_case(pool: WorkerPool, job: WindowJob, swap: dict, variant=None) -> dict:
    marks = [time.perf_counter()]
    cb = SamplingCallbacks(progress=lambda done, total: marks.append(time.perf_counter()))
    latents = pool.sample_window(job, cb, block_swap=swap,
                                 sp_options=sp_options(variant) if variant else None)
    steps = [b - a for a, b in zip(marks, marks[1:])]
    timed = steps[1:] or steps
    stats = pool.info["last_stats"]
    return {"step_seconds": steps, "median_step_s": statistics.median(timed),
            "layout": {"sequence": stats["sequence"], "guidance": stats["guidance"],
                       "rounds": stats.get("rounds")},
            "peak_vram_gb": [None if r["peak_vram_bytes"] is None
                             else round(r["peak_vram_bytes"] / 2 ** 30, 2)
                             for r in stats["ranks"]],
            "latents": latents}


def rel_errors(got: torch.Tensor, want: torch.Tensor) -> dict:
    got, want = got.double(), want.double()
    return {"rel_l2": float((got - want).norm() / want.norm()),
            "rel_max": float((got - want).abs().max() / want.abs().max())}


def cases(args) -> list[tuple[str, dict, int]]:
    swap_all = {"blocks_to_swap": args.blocks, "prefetch": 1}
    out = []
    for name, swap in (("blockswap_all", swap_all), ("resident", {"blocks_to_swap": 0})):
        if name in args.modes:
            out += [(name, swap, passes) for passes in (1, 3)]
    return out


def timed(pool: WorkerPool, args, size, case: tuple, variant=None) -> dict:
    name, swap, passes = case
    job = make_job(args.frames, size[0], size[1], args.steps, passes)
    r = run_case(pool, job, swap, variant)
    print(f"[multigpu] {pool.placement.world} device(s), {name}, {passes} pass(es), "
          f"sp {variant}: median step {r['median_step_s']:.3f} s, layout {r['layout']}, "
          f"peak VRAM {r['peak_vram_gb']} GiB", file=sys.stderr, flush=True)
    return r


def measure_all(one: WorkerPool, two: WorkerPool, args, size) -> tuple[dict, dict]:
    """Every case on 1 GPU, then on 2 GPUs per variant. Interleaved (the default): case by case,
    so each 1-GPU window runs right before its 2-GPU ones (the GPUs' clocks drift over a run:
    the same 1-GPU window measured 2.47-2.56 s in different runs)."""
    variants = args.sp.split(",")
    r1, r2 = {}, {v: {} for v in variants}
    if args.interleave:
        for case in cases(args):
            key = f"{case[0]}/{case[2]}pass"
            r1[key] = timed(one, args, size, case)
            for v in variants:
                r2[v][key] = timed(two, args, size, case, v)
        return r1, r2
    for case in cases(args):
        r1[f"{case[0]}/{case[2]}pass"] = timed(one, args, size, case)
    one.shutdown()
    for v in variants:
        for case in cases(args):
            r2[v][f"{case[0]}/{case[2]}pass"] = timed(two, args, size, case, v)
    return r1, r2


def start_pools(args, spec: ModelSpec, devices: list[str]) -> tuple[WorkerPool, WorkerPool, dict]:
    """Both pools at once: the builds overlap (GPU 0 holds two models for a while)."""
    one = WorkerPool(spec, Placement((devices[0],)))
    two = WorkerPool(spec, Placement(tuple(devices[:2])))
    box, t0 = {}, time.perf_counter()

    def start_one():
        try:
            one.start()
        except BaseException as e:   # reported below, after the other pool started
            box["error"] = e

    t = threading.Thread(target=start_one)
    t.start()
    try:
        two.start()
    except BaseException:
        t.join()
        one.shutdown()
        raise
    t.join()
    if "error" in box:
        two.shutdown()
        raise box["error"]
    return one, two, {"start_both_s": time.perf_counter() - t0}


def summarize(r1: dict, by_sp: dict) -> dict:
    """The headline is the first `--sp` variant; every measured one is listed beside it."""
    head = next(iter(by_sp))
    r2 = by_sp[head]
    out = {}
    for key in r1:
        a, b = r1[key], r2[key]
        out[key] = {"one_gpu_step_s": a["median_step_s"], "two_gpu_step_s": b["median_step_s"],
                    "speedup": a["median_step_s"] / b["median_step_s"],
                    "two_gpu_layout": b["layout"], "peak_vram_gb_one_gpu": a["peak_vram_gb"],
                    "peak_vram_gb_two_gpus": b["peak_vram_gb"],
                    "step_seconds_one_gpu": a["step_seconds"],
                    "step_seconds_two_gpus": b["step_seconds"]}
        out[key].update(rel_errors(b["latents"], a["latents"]))
        out[key]["sp"] = head
        out[key]["by_sp"] = {
            str(p): {"two_gpu_step_s": r[key]["median_step_s"],
                     "speedup": a["median_step_s"] / r[key]["median_step_s"],
                     "step_seconds": r[key]["step_seconds"],
                     **rel_errors(r[key]["latents"], a["latents"])}
            for p, r in by_sp.items()}
        target = TARGETS["one_pass_speedup" if key.endswith("1pass") else "three_pass_speedup"]
        out[key]["meets_targets"] = bool(out[key]["speedup"] >= target
                                         and out[key]["rel_l2"] <= TARGETS["rel_err"])
    return out


def parse(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--out")
    p.add_argument("--device", default="cuda", help="cuda (GPUs 0 and 1) or cpu (smoke test)")
    p.add_argument("--gpus", default="0,1", help="two CUDA indices: first = the 1-GPU run")
    p.add_argument("--tiny", action="store_true", help="small model and window (smoke test)")
    p.add_argument("--steps", type=int, default=4, help="steps per window (first = warm-up)")
    p.add_argument("--modes", default="blockswap_all,resident")
    p.add_argument("--quant", default="fp8_e4m3fn_scaled")
    p.add_argument("--sp", default="heads",
                   help="comma list of sequence-parallel variants (heads, heads:N, keys; "
                        "@send_recv / @copy_engine picks the transport), "
                        "each timed on 2 GPUs in the same run; the first is the headline")
    p.add_argument("--no-interleave", dest="interleave", action="store_false",
                   help="all 1-GPU windows first, then the 2-GPU ones (the older protocol)")
    p.add_argument("--fp8-dynamic", choices=("rows", "tensor"),
                   help="dynamic fp8 inputs in both pools: per row (quant_linear.DYNAMIC_ROWS, "
                        "the default: no scale all-reduces under the split) or per tensor")
    args = p.parse_args(argv)
    if args.tiny:
        args.blocks, args.dim, args.ffn, args.frames, args.size = 2, 256, 512, 9, "64x64"
    else:
        args.blocks, args.dim, args.ffn, args.frames, args.size = 40, 5120, 13824, 81, "832x480"
    return args


def main(argv=None):
    args = parse(argv)
    forbid_multicast()  # the workers inherit it
    size = tuple(int(v) for v in args.size.split("x"))
    devices = ["cpu", "cpu"] if args.device == "cpu" else \
        [f"cuda:{int(i)}" for i in args.gpus.split(",")][:2]
    spec = ModelSpec.make("multigpu:worker_model", sys_path=(BENCH,), blocks=args.blocks,
                          dim=args.dim, ffn=args.ffn, quant=args.quant, seed=0,
                          fp8_dynamic=args.fp8_dynamic)
    one, two, timing = start_pools(args, spec, devices)
    try:
        r1, r2 = measure_all(one, two, args, size)
    finally:
        one.shutdown()
        two.shutdown()
    gpu = torch.cuda.get_device_name(0) if args.device != "cpu" and torch.cuda.is_available() \
        else "cpu"
    f_lat, h, w = (args.frames - 1) // 4 + 1, size[1] // 8, size[0] // 8
    result = {"gpu": gpu, "torch": torch.__version__, "devices": devices,
              "model": f"{args.blocks} blocks dim {args.dim} ffn {args.ffn}, {args.quant}",
              "window": f"{size[0]}x{size[1]}x{args.frames}", "tokens": f_lat * (h // 2) * (w // 2),
              "steps": args.steps, "fp8_dynamic": args.fp8_dynamic or
              ("rows" if quant_linear.DYNAMIC_ROWS else "tensor"), "targets": TARGETS, **timing,
              "cases": summarize(r1, r2)}
    result["meets_targets"] = all(c["meets_targets"] for c in result["cases"].values())
    emit(result, args.out)
    return result


if __name__ == "__main__":
    main()
