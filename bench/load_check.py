"""Cost of the NaN/Inf check on checkpoint reads (CPU only; prints one JSON object).

    python bench/load_check.py [--blocks 1] [--dtype bf16|fp16|fp32|fp8] [--dir DIR] [--out FILE]

Writes a safetensors file holding `--blocks` transformer blocks with the real Wan2.1 14B shapes
(dim 5120, ffn 13824, I2V: ~0.81 GB per block in bf16), then reads every tensor the way
Checkpoint.read does: `read_tensor` (the read into a fresh allocation) and `check_finite` (the
check) timed separately, over two passes with the file in the page cache (the fastest a read can
be, so the largest relative overhead) and one after dropping this file's pages from the cache
(posix_fadvise DONTNEED; nothing else is evicted). `isfinite_all_s` times the obvious alternative,
torch.isfinite(t).all(), on the same tensors. overhead_ratio = check_s / read_s (warm).
"""
from __future__ import annotations

import argparse
import json
import os
import struct
import tempfile
import time

import torch

from common import emit  # noqa: E402  (also makes the pack importable)

from wanvideo_infinitetalk.wanvideo.checkpoint import (SAFETENSORS_DTYPES, check_finite,  # noqa: E402
                                                       read_header, read_tensor)
from wanvideo_infinitetalk.wanvideo.config import WanConfig  # noqa: E402
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
          "fp8": torch.float8_e4m3fn}


def block_shapes(blocks: int) -> dict[str, tuple[int, ...]]:
    cfg = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=blocks, in_dim=36,
                    out_dim=16, has_image_embedding=True)
    state = build_meta_model(cfg).state_dict()
    return {k: tuple(v.shape) for k, v in state.items() if k.startswith("blocks.")}


def write_file(path: str, shapes: dict, dtype: torch.dtype) -> int:
    """Streams random tensors to `path` (one tensor in memory at a time); returns data bytes."""
    names = {d: n for n, d in SAFETENSORS_DTYPES.items()}
    header, cursor = {}, 0
    for key, shape in shapes.items():
        n = dtype.itemsize * torch.Size(shape).numel()
        header[key] = {"dtype": names[dtype], "shape": list(shape), "data_offsets": [cursor, cursor + n]}
        cursor += n
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator().manual_seed(0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            t = torch.randn(shape, generator=gen).mul_(0.02).to(dtype)
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return cursor


def timed_pass(infos) -> tuple[float, float]:
    read_s = check_s = 0.0
    for info in infos:
        t0 = time.perf_counter()
        t = read_tensor(info)
        t1 = time.perf_counter()
        check_finite(t, "bench", info.key)
        read_s, check_s = read_s + t1 - t0, check_s + time.perf_counter() - t1
    return read_s, check_s


def isfinite_pass(infos) -> float | None:
    total = 0.0
    for info in infos:
        t = read_tensor(info)
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            return None  # not implemented for fp8 on the CPU
        t0 = time.perf_counter()
        assert bool(torch.isfinite(t).all())
        total += time.perf_counter() - t0
    return total


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--dir", default=None, help="where the temporary file goes (default: system temp)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        path = os.path.join(d, "load_check.safetensors")
        t0 = time.perf_counter()
        nbytes = write_file(path, block_shapes(args.blocks), DTYPES[args.dtype])
        write_s = time.perf_counter() - t0
        infos = list(read_header(path)[0].values())
        passes = [timed_pass(infos) for _ in range(2)]
        read_s, check_s = min(p[0] for p in passes), min(p[1] for p in passes)
        drop_cache(path)
        cold_read_s, cold_check_s = timed_pass(infos)
        isfinite_s = isfinite_pass(infos)
    gb = nbytes / 1e9
    emit({"blocks": args.blocks, "dtype": args.dtype, "tensors": len(infos), "gb": round(gb, 3),
          "threads": torch.get_num_threads(), "write_s": round(write_s, 3),
          "read_s": round(read_s, 4), "check_s": round(check_s, 4),
          "overhead_ratio": round(check_s / read_s, 4),
          "read_gb_per_s": round(gb / read_s, 2), "check_gb_per_s": round(gb / check_s, 2),
          "cold_read_s": round(cold_read_s, 4), "cold_check_s": round(cold_check_s, 4),
          "cold_overhead_ratio": round(cold_check_s / cold_read_s, 4),
          "isfinite_all_s": isfinite_s and round(isfinite_s, 4),
          "isfinite_all_gb_per_s": isfinite_s and round(gb / isfinite_s, 2)},
         args.out)


if __name__ == "__main__":
    main()
