"""One full InfiniteTalk window on a 14B-shaped model: fp8 weights, every block swapped.

    python bench/window.py --json [--steps 4] [--blocks 40] [--frames 81] [--size 832x480]
    python bench/window.py --json --attention sdpa,int8     # both backends, same model, same run
    python bench/window.py --json --steps 2 --attention int8 --profile 50   # + top CUDA kernels

A 14B-shaped Wan2.1 I2V model with InfiniteTalk layers is built from random weights (no file),
quantized to fp8 (scaled) on load, all blocks streamed by BlockSwap, and one 81-frame window at
832x480 is sampled through multitalk.pipeline.generate_video with the full 3-pass guidance. The
VAE is a stand-in (pooling / nearest upsampling): this measures the transformer side. Prints one
JSON object: seconds per step, peak VRAM, BlockSwap statistics.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from common import attention_spec, build, emit  # noqa: E402  (also loads the pack as wanvideo_infinitetalk)

from wanvideo_infinitetalk.multitalk.pipeline import VideoRequest, generate_video  # noqa: E402
from wanvideo_infinitetalk.wanvideo.block_swap import BlockSwap  # noqa: E402


def stand_in_vae(device):
    def encode(frames):  # [F, H, W, 3] -> [1, 16, F_lat, h, w]
        x = frames.to(device, torch.float32).permute(3, 0, 1, 2)[None]
        first, rest = x[:, :, :1], x[:, :, 1:]
        pooled = [F.avg_pool3d(first, (1, 8, 8))]
        if rest.shape[2]:
            pooled.append(F.avg_pool3d(rest, (4, 8, 8)))
        z = torch.cat(pooled, dim=2)
        return z.repeat(1, 6, 1, 1, 1)[:, :16]

    def decode(latents):  # [1, 16, F_lat, h, w] -> [F, H, W, 3]
        z = latents[0, :3].float()
        first = F.interpolate(z[:, :1][None], scale_factor=(1, 8, 8))[0]
        rest = F.interpolate(z[:, 1:][None], scale_factor=(4, 8, 8))[0]
        return torch.sigmoid(torch.cat([first, rest], dim=1)).permute(1, 2, 3, 0)

    return encode, decode


def run_window(model, swap, request, encode, decode, backend: str, cuda: bool) -> dict:
    """One window with `backend` attention: step times (the first includes warm-up), total,
    peak VRAM, BlockSwap statistics of this window only."""
    with attention_spec(backend) as name:
        model.set_attention(name)
        return _timed_window(model, swap, request, encode, decode, cuda)


def _timed_window(model, swap, request, encode, decode, cuda: bool) -> dict:
    from wanvideo_infinitetalk.wanvideo.sampling import SamplingCallbacks

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    swap.reset_stats()
    step_times, last = [], [time.perf_counter()]

    def progress(done, total):
        sync()
        now = time.perf_counter()
        step_times.append(now - last[0])
        last[0] = now

    t1 = time.perf_counter()
    result = generate_video(model, request, encode, decode, SamplingCallbacks(progress=progress))
    sync()
    return {"seconds_per_step": step_times, "window_seconds": time.perf_counter() - t1,
            "frames_out": result.num_frames,
            "peak_vram_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None,
            "block_swap": swap.stats(), "finite": bool(torch.isfinite(result.frames).all())}


def profile_window(model, swap, request, encode, decode, backend: str, rows: int) -> list:
    """The window sampled once under the torch profiler: its top `rows` CUDA kernels by total
    time, as [ms per step, calls per step, name] (copies on BlockSwap's stream included)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_window(model, swap, request, encode, decode, backend, True)
    events = sorted((e for e in prof.key_averages() if e.device_time_total > 0),
                    key=lambda e: -e.device_time_total)
    steps = request.steps
    table = [[round(e.device_time_total / 1e3 / steps, 3), e.count / steps, e.key[:120]]
             for e in events[:rows]]
    total = sum(e.device_time_total for e in events) / 1e3 / steps
    return [[round(total, 3), None, "total of all kernels"]] + table


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--json", action="store_true")
    p.add_argument("--out")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--frames", type=int, default=81)
    p.add_argument("--size", default="832x480")
    p.add_argument("--quant", default="fp8_e4m3fn_scaled")
    p.add_argument("--prefetch", type=int, default=1)
    p.add_argument("--dim", type=int, default=5120)
    p.add_argument("--ffn", type=int, default=13824)
    p.add_argument("--device", default="cuda", help="cpu only for a smoke test with small --dim")
    p.add_argument("--profile", type=int, default=0, metavar="ROWS",
                   help="also sample the window once more per backend under the torch profiler "
                        "and record its top ROWS CUDA kernels (ms per step) in the JSON")
    p.add_argument("--attention", default="sdpa",
                   help="comma list of attention backends (wanvideo/attention.py), each sampling "
                        "the same window on the same model in turn; int8@N: the 8-bit kernel "
                        "with attention_int8.SWEEP[N]'s launch settings")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    t0 = time.perf_counter()
    dev = args.device
    cuda = dev.startswith("cuda")
    model = build(args.blocks, args.quant, args.dim, args.ffn, dev)
    build_s = time.perf_counter() - t0
    swap = BlockSwap(blocks_to_swap=args.blocks, device=dev, prefetch=args.prefetch).attach(model)
    f_lat, h, w = (args.frames - 1) // 4 + 1, height // 8, width // 8
    g = torch.Generator().manual_seed(0)
    request = VideoRequest(
        reference=torch.rand(height, width, 3, generator=g),
        y=torch.randn(1, 20, f_lat, h, w, generator=g),
        clip_fea=torch.randn(1, 257, 1280, generator=g),
        positive=torch.randn(1, 512, 4096, generator=g), negative=torch.randn(1, 512, 4096, generator=g),
        features=[torch.randn(args.frames, 12, 768, generator=g)],
        steps=args.steps, clip_frames=args.frames, device=dev, seed=0)
    encode, decode = stand_in_vae(dev)
    runs = {backend: run_window(model, swap, request, encode, decode, backend, cuda)
            for backend in args.attention.split(",")}
    if args.profile and cuda:
        for backend in runs:
            runs[backend]["kernels_per_step"] = profile_window(
                model, swap, request, encode, decode, backend, args.profile)
    first = next(iter(runs.values()))
    out = {
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
        "blocks": args.blocks, "blocks_swapped": args.blocks, "quantization": args.quant,
        "size": f"{width}x{height}x{args.frames}", "tokens": f_lat * (h // 2) * (w // 2),
        "steps": args.steps, "passes_per_step": 3, "build_seconds": build_s,
        "attention": args.attention, **first, "by_attention": runs,
    }
    emit(out, args.out)


if __name__ == "__main__":
    main()
