"""Top CUDA kernels of one forward of a 14B-shaped model (2 blocks), bf16 vs fp8 scaled_mm.

    python bench/profile_forward.py [--blocks 2] [--tokens 32760] [--rows 30] [--attention int8]

A diagnostic for performance work, not a benchmark: prints, per variant, the kernels by total
CUDA time (ms per forward, calls, share of the forward).
"""
from __future__ import annotations

import argparse

import torch

from common import attention_spec, build  # noqa: E402
from quant import inputs  # noqa: E402


def kernel_table(prof, rows: int) -> str:
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    events.sort(key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in events)
    lines = [f"total {total / 1e3:.2f} ms"]
    for e in events[:rows]:
        lines.append(f"{e.device_time_total / 1e3:9.3f} ms {e.count:5d}x {100 * e.device_time_total / total:5.1f}%  "
                     f"{e.key[:110]}")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--rows", type=int, default=30)
    ap.add_argument("--attention", default="sdpa", help="backend of the fp8 variant (bf16: SDPA)")
    args = ap.parse_args(argv)
    x = inputs(args.tokens)
    for fmt in ("none", "fp8_e4m3fn_scaled"):
        model = build(args.blocks, fmt, storage="cuda")
        backend = "sdpa" if fmt == "none" else args.attention
        with attention_spec(backend) as name, torch.no_grad():
            model.set_attention(name)
            for _ in range(2):
                model(**x)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(**x)
                torch.cuda.synchronize()
        print(f"==== {fmt}, attention {backend} ====")
        print(kernel_table(prof, args.rows))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
