"""Host RAM while loading a pre-quantized fp8 file with an InfiniteTalk patch and a LoRA, as the
model loader node does for the fp8 release (quantization none, weights in host RAM): the peak may
exceed the loaded model only by what one layer's LoRA merge and the LoRA file take, never by a
second copy of the model.

Full size, through a ComfyUI server (bench/results/e2e_h200_card24_16.json), the server's RSS
rose 14 GB above the loaded model right after the fp8 base was read: placement.materialize
re-homed every fp8 buffer while holding the list of the originals, so the whole 16 GB of fp8
weights sat in memory twice. This is that load at reduced scale (24 blocks of dim 1024, 464 MiB
fp8 file), measured in a fresh process (tests/load_memory.py: VmHWM above the RSS just before
the call). With the originals held the peak was 917 MiB against a bound of 767 MiB (model 637
MiB); streamed it is 713 MiB.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from wanvideo_infinitetalk.multitalk.tiny import infinitetalk_shapes
from wanvideo_infinitetalk.wanvideo.config import WanConfig
from wanvideo_infinitetalk.wanvideo.safetensors_writer import write_streamed
from wanvideo_infinitetalk.wanvideo.stand_in_values import file_order, spec
from wanvideo_infinitetalk.wanvideo.stand_ins import FP8, lora_specs, wan_transformer_specs

# The 14B's proportions (ffn = 4 x dim, I2V) at 1/5 of its width and 3/5 of its depth: the fp8
# linears outweigh the patch as in the real files (16.2 vs 5.0 GB there, 464 vs 172 MiB here).
CFG = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=24, in_dim=36, out_dim=16,
                has_image_embedding=True)
MIB = 1 << 20
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load_memory.py")
# The LoRA covers two blocks only: merging into fp8 layers on the CPU is slow (dequantize,
# merge, quantize again per layer) and the peak depends on the largest layer, not their number.
LORA_BLOCKS = ("diffusion_model.blocks.0.", "diffusion_model.blocks.1.")


def write_cheap(path: str, specs: dict) -> str:
    """A file with the layout of `specs` whose values repeat one small random block per dtype:
    drawing ~540 MB of normal values took 15 s on two busy cores, and only the bytes count here."""
    pool: dict = {}

    def chunks(key):
        dtype, n = specs[key].dtype, math.prod(specs[key].shape)
        if dtype not in pool:
            gen = torch.Generator().manual_seed(0)
            pool[dtype] = torch.randn(1 << 22, generator=gen).mul_(0.05).to(dtype)
        src = pool[dtype]
        for start in range(0, n, src.numel()):
            yield src[:min(src.numel(), n - start)]

    write_streamed(path, {k: (specs[k].shape, specs[k].dtype) for k in file_order(specs)}, chunks)
    return path


def write_files(folder) -> tuple[str, str, str]:
    base = write_cheap(str(folder / "base_fp8.safetensors"), wan_transformer_specs(FP8, CFG))
    # A narrow audio encoder (32 channels) keeps audio_proj small, as it is next to a 14B.
    shapes = infinitetalk_shapes(CFG.dim, CFG.num_layers, intermediate=64, channels=32)
    patch = write_cheap(str(folder / "patch_fp16.safetensors"),
                        {k: spec(k, s, torch.float16) for k, s in shapes.items()})
    lora = write_cheap(str(folder / "lora.safetensors"),
                       {k: v for k, v in lora_specs(16, CFG).items() if k.startswith(LORA_BLOCKS)})
    return base, patch, lora


def test_peak_host_memory_of_fp8_file_with_patch_and_lora(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/status")
    base, patch, lora = write_files(tmp_path)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MIB), WANVIDEO_CHECK_LAYOUT="0")
    res = subprocess.run([sys.executable, HELPER, base, "none", "streamed", "--patch", patch,
                          "--lora", lora], env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    run = json.loads(res.stdout.strip().splitlines()[-1])
    assert run["quantized_layers"] == CFG.num_layers * 12  # the file's fp8 linears, kept as fp8
    # One layer merged at a time: its fp32 weight, delta, sum and re-quantized copy, plus the
    # whole LoRA file (merge_loras reads it at once) and allocator slack.
    bound = run["final_bytes"] + 4 * run["largest_fp32_layer"] + os.path.getsize(lora) + 64 * MIB
    print(f"peak above baseline {run['peak_above_baseline'] / MIB:.1f} MiB, kept "
          f"{run['rss_after_above_baseline'] / MIB:.1f} MiB, model {run['final_bytes'] / MIB:.1f} "
          f"MiB, bound {bound / MIB:.1f} MiB, fp8 file {os.path.getsize(base) / MIB:.1f} MiB, "
          f"patch {os.path.getsize(patch) / MIB:.1f} MiB, {run['seconds']:.1f} s")
    assert run["peak_above_baseline"] <= bound
