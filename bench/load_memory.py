"""Host RAM while loading a 14B-shaped model with quantization (prints one JSON object).

    python bench/load_memory.py [--dir DIR] [--budget-s 300] [--out FILE]

Writes three bf16 files of random weights with the real shapes: a Wan2.1 14B I2V transformer
(32.8 GB), an InfiniteTalk patch for it (5.0 GB) and a rank-32 LoRA on every block linear
(0.36 GB); then loads them in fresh processes through tests/load_memory.py (weights stored in host
RAM, quantization math on CUDA, like the model loader node with load_device offload_device):
quantizing while loading and the older order (everything in bf16 first, then LoRA, then
quantize), fp8_e4m3fn_scaled, then streamed nvfp4. peak_above_baseline is the peak RSS of the load
above the process's RSS just before it; final_bytes the model's host bytes once loaded. No new
run starts once `--budget-s` has passed since the files were written.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, emit  # noqa: E402  (also makes the pack importable)

from wanvideo_infinitetalk.multitalk.tiny import infinitetalk_shapes  # noqa: E402
from wanvideo_infinitetalk.wanvideo.config import WAN21_14B_I2V as CFG  # noqa: E402
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model  # noqa: E402
from wanvideo_infinitetalk.wanvideo.quantize import quantize_targets  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
import load_memory as lm  # noqa: E402

HELPER = os.path.join(ROOT, "tests", "load_memory.py")
RUNS = (("streamed", "fp8_e4m3fn_scaled"), ("old", "fp8_e4m3fn_scaled"), ("streamed", "nvfp4"))


def write_files(d: str, results: dict) -> tuple[str, str, str]:
    base, patch, lora = (os.path.join(d, n) for n in ("base.safetensors", "it.safetensors",
                                                      "lora.safetensors"))
    start = time.time()
    results["base_bytes"] = lm.write_random_checkpoint(base, CFG, device="cuda")
    results["patch_bytes"] = lm.write_random_file(patch, infinitetalk_shapes(CFG.dim, CFG.num_layers),
                                                  1, "cuda")
    shapes = {}
    for name, lin in quantize_targets(build_meta_model(CFG)):
        shapes[f"diffusion_model.{name}.lora_down.weight"] = (32, lin.in_features)
        shapes[f"diffusion_model.{name}.lora_up.weight"] = (lin.out_features, 32)
    results["lora_bytes"] = lm.write_random_file(lora, shapes, 2, "cuda")
    results["write_seconds"] = time.time() - start
    return base, patch, lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/w14")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--out")
    args = ap.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    results: dict = {}
    base, patch, lora = write_files(args.dir, results)
    start = time.time()
    for mode, fmt in RUNS:
        if time.time() - start > args.budget_s:
            break
        r = subprocess.run([sys.executable, HELPER, base, fmt, mode, "--compute-device", "cuda",
                            "--patch", patch, "--lora", lora], capture_output=True, text=True)
        results[f"{mode}_{fmt}"] = (json.loads(r.stdout.strip().splitlines()[-1])
                                    if r.returncode == 0 else r.stderr[-3000:])
    emit(results, args.out)


if __name__ == "__main__":
    main()
