"""Dubbing vs image mode, time per window, on a 14B-shaped model (fp8, every block swapped).

    python bench/dubbing.py [--comfy .cache/ComfyUI] [--windows 2] [--recipes 4x1,2x3] [--out FILE]

Both modes run the same windows through multitalk.pipeline.generate_video in one process. Dubbing
adds, per window, what the official code adds: a VAE encode of the window's source frame followed
by clip - 1 grey frames, and a CLIP vision encode of that frame. The VAE is ComfyUI's Wan 2.1 VAE
class (comfy.ldm.wan.vae.WanVAE, random weights, real size) when ComfyUI's source is given with
--comfy, else a pooling stand-in; the CLIP encoder is a ViT-H-sized transformer (32 layers, width
1280, 257 tokens) with random weights. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from common import build, emit  # noqa: E402  (also loads the pack as wanvideo_infinitetalk)
from window import stand_in_vae  # noqa: E402

from wanvideo_infinitetalk.multitalk.dubbing import WindowCondition, dubbing_conditions  # noqa: E402,E501
from wanvideo_infinitetalk.multitalk.frame_source import TensorFrames  # noqa: E402
from wanvideo_infinitetalk.multitalk.long_video import plan_long_video  # noqa: E402
from wanvideo_infinitetalk.multitalk.pipeline import VideoRequest, generate_video  # noqa: E402
from wanvideo_infinitetalk.multitalk.reference_schedule import reference_schedule  # noqa: E402
from wanvideo_infinitetalk.wanvideo.block_swap import BlockSwap  # noqa: E402


def comfy_wan_vae(comfy_dir: str, device):
    """encode/decode with ComfyUI's Wan 2.1 VAE architecture (random weights)."""
    sys.path.insert(0, os.path.abspath(comfy_dir))
    from comfy.ldm.wan.vae import WanVAE

    # ComfyUI's own settings for the Wan 2.1 VAE file (comfy/sd.py)
    vae = WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True], dropout=0.0)
    vae = vae.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(frames):
        x = frames.to(device, torch.bfloat16).permute(3, 0, 1, 2)[None] * 2 - 1
        return torch.nan_to_num(vae.encode(x).float())

    @torch.no_grad()
    def decode(latents):
        y = vae.decode(latents.to(device, torch.bfloat16)).float()
        return torch.sigmoid(torch.nan_to_num(y[0])).permute(1, 2, 3, 0)

    return encode, decode


def clip_stand_in(device):
    layer = torch.nn.TransformerEncoderLayer(1280, 16, 5120, batch_first=True, norm_first=True)
    enc = torch.nn.TransformerEncoder(layer, 32, enable_nested_tensor=False)
    enc = enc.to(device=device, dtype=torch.bfloat16).eval().requires_grad_(False)
    patch = torch.nn.Conv2d(3, 1280, 14, 14).to(device, torch.bfloat16)

    @torch.no_grad()
    def encode(frame):   # [1, H, W, 3] -> [1, 257, 1280]
        x = torch.nn.functional.interpolate(frame.permute(0, 3, 1, 2).to(device, torch.bfloat16),
                                            size=(224, 224), mode="bicubic")
        tok = patch(x).flatten(2).transpose(1, 2)
        tok = torch.cat([tok[:, :1], tok], dim=1)
        return enc(tok).float().cpu()

    return encode


def request_for(frames: int, width: int, height: int, steps: int, device, encode, passes: int):
    """A request whose y is encoded from a random reference (image mode's one-time encode)."""
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(height, width, 3, generator=g)
    from wanvideo_infinitetalk.multitalk.pipeline import condition_frames, condition_y

    y = condition_y(encode(condition_frames(ref, 81)).cpu())
    return VideoRequest(
        reference=ref, y=y, clip_fea=torch.randn(1, 257, 1280, generator=g),
        positive=torch.randn(1, 512, 4096, generator=g), negative=torch.randn(1, 512, 4096, generator=g),
        features=[torch.randn(frames, 12, 768, generator=g)], steps=steps,
        text_scale=1.0 if passes == 1 else 5.0, audio_scale=1.0 if passes == 1 else 4.0,
        device=device, seed=0, audio_frames=frames)


def run(model, request, encode, decode, sync) -> dict:
    sync()
    t0 = time.perf_counter()
    result = generate_video(model, request, encode, decode)
    sync()
    per = [w["sample_s"] + w["decode_s"] + w["encode_s"] for w in result.window_log]
    return {"total_s": time.perf_counter() - t0, "per_window_s": per,
            "mean_window_s": sum(per) / len(per), "windows": len(per)}


def compare(model, recipe: tuple[int, int], frames: int, width: int, height: int, dev,
            encode, decode, clip) -> dict:
    """Image mode then dubbing, same windows; `recipe` = (steps, passes per step)."""
    steps, passes = recipe
    sync = torch.cuda.synchronize
    image = request_for(frames, width, height, steps, dev, encode, passes)
    run(model, image, encode, decode, sync)            # warm-up: kernels, allocator, slots
    image_mode = run(model, image, encode, decode, sync)
    dub = request_for(frames, width, height, steps, dev, encode, passes)
    source = TensorFrames(torch.rand(frames, height, width, 3), 25.0)
    schedule = reference_schedule(plan_long_video(frames), source.num_frames, source.fps)
    first = WindowCondition(dub.y, dub.clip_fea, dub.reference, 0)
    dub.window_condition = dubbing_conditions(
        schedule, source.read(schedule.needed(), width, height), 81, encode, clip, device=dev,
        known=first)
    dubbing = run(model, dub, encode, decode, sync)
    return {"steps": steps, "passes_per_step": passes, "image_mode": image_mode,
            "dubbing": dubbing, "ratio": dubbing["mean_window_s"] / image_mode["mean_window_s"]}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--comfy", help="ComfyUI source folder (for its Wan VAE class)")
    p.add_argument("--windows", type=int, default=2)
    p.add_argument("--recipes", default="4x1",
                   help="comma list of STEPSxPASSES: passes 1 = the distilled-LoRA recipe "
                        "(guidance 1/1), 3 = text 5 + audio 4")
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--size", default="832x480")
    p.add_argument("--out")
    args = p.parse_args(argv)
    width, height = (int(v) for v in args.size.split("x"))
    dev = "cuda"
    model = build(args.blocks, "fp8_e4m3fn_scaled", 5120, 13824, dev)
    BlockSwap(blocks_to_swap=args.blocks, device=dev).attach(model)
    vae_kind = "comfy WanVAE (random weights)" if args.comfy else "pooling stand-in"
    encode, decode = comfy_wan_vae(args.comfy, dev) if args.comfy else stand_in_vae(dev)
    clip = clip_stand_in(dev)
    frames = 81 + 72 * (args.windows - 1)
    recipes = [tuple(int(v) for v in r.split("x")) for r in args.recipes.split(",")]
    results = [compare(model, r, frames, width, height, dev, encode, decode, clip)
               for r in recipes]
    emit({"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
          "model": "14B-shaped I2V + InfiniteTalk, fp8_e4m3fn_scaled, all 40 blocks swapped",
          "size": f"{width}x{height}x81", "windows": args.windows, "vae": vae_kind,
          "clip": "ViT-H-sized stand-in", "recipes": results,
          "peak_vram_gb": torch.cuda.max_memory_allocated() / 1e9}, args.out)


if __name__ == "__main__":
    main()
