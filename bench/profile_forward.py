"""Top CUDA kernels of one forward of a 14B-shaped model (2 blocks), bf16 vs fp8 scaled_mm.

    python bench/profile_forward.py [--blocks 2] [--tokens 32760]

A diagnostic for performance work, not a benchmark: prints torch.profiler tables.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import build  # noqa: E402
from quant import inputs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32760)
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args(argv)
    x = inputs(args.tokens)
    for fmt in ("none", "fp8_e4m3fn_scaled"):
        model = build(args.blocks, fmt, storage="cuda")
        with torch.no_grad():
            for _ in range(2):
                model(**x)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                model(**x)
                torch.cuda.synchronize()
        print(f"==== {fmt} ====")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))
        del model
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
