"""Host RAM while loading a 14B-shaped model (prints one JSON object).

    python bench/load_memory.py [--dir DIR] [--budget-s 300] [--out FILE]
    python bench/load_memory.py --case fp8-patch-lora [--dir MODELS_DIR] [--out FILE]

Writes three bf16 files of random weights with the real shapes: a Wan2.1 14B I2V transformer
(32.8 GB), an InfiniteTalk patch for it (5.0 GB) and a rank-32 LoRA on every block linear
(0.36 GB); then loads them in fresh processes through tests/load_memory.py (weights stored in host
RAM, quantization math on CUDA, like the model loader node with load_device offload_device):
quantizing while loading and the older order (everything in bf16 first, then LoRA, then
quantize), fp8_e4m3fn_scaled, then streamed nvfp4. peak_above_baseline is the peak RSS of the load
above the process's RSS just before it; final_bytes the model's host bytes once loaded. No new
run starts once `--budget-s` has passed since the files were written.

`--case fp8-patch-lora` is the model loader node's load of the fp8 release instead (quantization
none, fp8_matmul fast, weights in host RAM, LoRA merged on CUDA): full-size stand-ins of
wan2.1_i2v_480p_14B_fp8_e4m3fn (16.6 GB), the InfiniteTalk single patch (5.0 GB fp16) and the
lightx2v rank-64 LoRA (0.72 GB), taken from the ComfyUI models folder `--dir` where present and
written there on the GPU where not (multitalk/stand_ins.py, as `python -m wanvideo.make_full_size`
does). One load in a fresh process, with the RSS over time; target: peak <= final host bytes + 3 GB.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from common import ROOT, emit  # noqa: E402  (also makes the pack importable)

from wanvideo_infinitetalk.multitalk.stand_ins import (PATCH_NAME,  # noqa: E402
                                                       write_full_size_stand_ins)
from wanvideo_infinitetalk.multitalk.tiny import infinitetalk_shapes  # noqa: E402
from wanvideo_infinitetalk.wanvideo.config import WAN21_14B_I2V as CFG  # noqa: E402
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model  # noqa: E402
from wanvideo_infinitetalk.wanvideo.quantize import quantize_targets  # noqa: E402
from wanvideo_infinitetalk.wanvideo.stand_ins import STAND_INS  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "tests"))
import load_memory as lm  # noqa: E402

HELPER = os.path.join(ROOT, "tests", "load_memory.py")
RUNS = (("streamed", "fp8_e4m3fn_scaled"), ("old", "fp8_e4m3fn_scaled"), ("streamed", "nvfp4"))
FP8_NAME = "wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors"
LORA_NAME = "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors"
TARGET_SLACK = 3e9  # the target: peak RSS of a load <= the model's host bytes + 3 GB


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


def stand_in_files(models: str, results: dict, device: str) -> tuple[str, str, str]:
    """The fp8 transformer, patch and LoRA under the ComfyUI models folder `models`, the missing
    ones written there first (values drawn on `device`: cuda takes seconds, the CPU minutes)."""
    paths = {FP8_NAME: os.path.join(models, STAND_INS[FP8_NAME].folder, FP8_NAME),
             PATCH_NAME: os.path.join(models, "infinitetalk", PATCH_NAME),
             LORA_NAME: os.path.join(models, STAND_INS[LORA_NAME].folder, LORA_NAME)}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    start = time.time()
    if missing:
        write_full_size_stand_ins(models, only=missing, device=device,
                                  log=lambda line: print(line, file=sys.stderr, flush=True))
    results["written"], results["write_seconds"] = missing, time.time() - start
    results["file_bytes"] = {name: os.path.getsize(path) for name, path in paths.items()}
    return paths[FP8_NAME], paths[PATCH_NAME], paths[LORA_NAME]


def fp8_patch_lora(models: str, results: dict, compute_device: str) -> None:
    base, patch, lora = stand_in_files(models, results, compute_device)
    r = subprocess.run([sys.executable, HELPER, base, "none", "streamed", "--compute-device",
                        compute_device,
                        "--patch", patch, "--lora", lora, "--timeline"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        results["error"] = r.stderr[-3000:]
        return
    run = json.loads(r.stdout.strip().splitlines()[-1])
    run["peak_minus_final_gb"] = (run["peak_above_baseline"] - run["final_bytes"]) / 1e9
    run["target_met"] = run["peak_above_baseline"] <= run["final_bytes"] + TARGET_SLACK
    results["fp8_patch_lora"] = run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--case", choices=("quantize", "fp8-patch-lora"), default="quantize")
    ap.add_argument("--dir", default=None, help="work folder (default /tmp/w14); for "
                    "fp8-patch-lora a ComfyUI models folder (default /tmp/w14_models)")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--compute-device", default="cuda",
                    help="fp8-patch-lora: where the LoRA merges (cpu only for a smoke test)")
    ap.add_argument("--out")
    args = ap.parse_args()
    results: dict = {"case": args.case}
    if args.case == "fp8-patch-lora":
        fp8_patch_lora(args.dir or "/tmp/w14_models", results, args.compute_device)
        emit(results, args.out)
        return
    args.dir = args.dir or "/tmp/w14"
    os.makedirs(args.dir, exist_ok=True)
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
