"""BlockSwap benchmark: a 14B-shaped Wan2.1 I2V + InfiniteTalk transformer, bf16, random weights.

    python bench/blockswap.py --json [--out FILE] [--blocks 40] [--cases 81,33] [--budget-s 450]

Variants, each on both cases (1 warmup + 2 timed forwards, CUDA events; naive: 1 timed):
  resident        every weight on the GPU (14B bf16 + audio layers ~ 39 GB)
  ours_depth1/2   wanvideo.block_swap with ALL blocks swapped, prefetch 1 and 2
  naive           before each block: synchronous block.to("cuda") + re-contiguify every parameter;
                  after it: block.to("cpu") (the usual hand-rolled block swap)
  diffusers_group diffusers' apply_group_offloading(block_level, 1 block per group, use_stream=True)
                  on WanTransformer3DModel with the same config and the same audio-layer bytes per
                  block (skipped with a note when diffusers is not importable); its ratio is to
                  diffusers' own resident time, measured first.
Weights are generated on the GPU (fast), BlockSwap packs them into pinned host masters. Prints one
JSON object. Variants stop being started once --budget-s is spent (noted in the JSON).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
from collections.abc import Mapping

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "wanvideo"))
import _pack  # noqa: E402

sys.path.pop(0)
_pack.load_pack()
from wanvideo_infinitetalk.wanvideo import placement  # noqa: E402
from wanvideo_infinitetalk.wanvideo.block_swap import BlockSwap  # noqa: E402
from wanvideo_infinitetalk.wanvideo.config import WanConfig  # noqa: E402
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model, storage_dtype_policy  # noqa: E402
from wanvideo_infinitetalk.wanvideo.model import WanLayerNorm  # noqa: E402

CASES = {  # name: (video W, H, frames) -> latent (F, H/8, W/8)
    "81": ("832x480x81", 21, 60, 104),
    "33": ("480x480x33", 9, 60, 60),
}
AUDIO_DIM = 768


def config(blocks: int) -> WanConfig:
    return WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=blocks, in_dim=36,
                     out_dim=16, has_image_embedding=True)


def random_like(shape, dtype, device):
    if len(shape) >= 2:
        fan_in = math.prod(shape[1:])
        return torch.randn(shape, dtype=dtype, device=device).mul_(1.0 / math.sqrt(fan_in))
    return (1.0 + 0.02 * torch.randn(shape, device=device)).to(dtype)


class RandomWeights(Mapping):
    """A state dict whose tensors are drawn on demand on the GPU (no file, no host copy)."""

    def __init__(self, shapes, device):
        self.shapes, self.device = shapes, device

    def __getitem__(self, key):
        return random_like(self.shapes[key], torch.bfloat16, self.device)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


def add_audio_layers(blocks, dim, device, notes):
    """InfiniteTalk-shaped per-block layers: norm_x LayerNorm(dim), q_linear/proj dim x dim,
    kv_linear 2*dim x 768 (all bf16 with bias). Plain submodules: the bench passes no audio."""
    for block in blocks:
        norm = WanLayerNorm(dim, elementwise_affine=True).to(device=device, dtype=torch.bfloat16)
        attn = nn.Module()
        attn.q_linear = nn.Linear(dim, dim, device=device, dtype=torch.bfloat16)
        attn.kv_linear = nn.Linear(AUDIO_DIM, 2 * dim, device=device, dtype=torch.bfloat16)
        attn.proj = nn.Linear(dim, dim, device=device, dtype=torch.bfloat16)
        block.norm_x, block.audio_cross_attn = norm, attn
    notes.append("InfiniteTalk per-block layers added as shape-alike submodules (no audio input)")


def build_ours(cfg, device, notes):
    model = build_meta_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    placement.materialize(model, RandomWeights(shapes, device), device,
                          dtype_for=storage_dtype_policy(torch.bfloat16), where="random")
    model.compute_dtype = torch.bfloat16
    add_audio_layers(model.blocks, cfg.dim, device, notes)
    return model.eval().requires_grad_(False)


def module_bytes(module):
    seen = {id(t): t for _, t in placement.named_tensors(module)}
    return sum(t.numel() * t.element_size() for t in seen.values())


def make_inputs(cfg, case, device):
    _, f, h, w = CASES[case]
    g = torch.Generator(device=device).manual_seed(0)
    bf = dict(device=device, dtype=torch.bfloat16, generator=g)
    return dict(x=torch.randn(1, 16, f, h, w, **bf), t=torch.tensor([900.0], device=device),
                context=torch.randn(1, 512, cfg.text_dim, **bf),
                clip_fea=torch.randn(1, 257, cfg.clip_dim, **bf),
                y=torch.randn(1, 20, f, h, w, **bf))


def tokens_of(case):
    _, f, h, w = CASES[case]
    return f * (h // 2) * (w // 2)


def time_forwards(fn, timed=2):
    """1 warmup + `timed` forwards; returns (mean ms, peak VRAM bytes during the timed ones)."""
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(timed):
            out = fn()
            del out
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / timed, torch.cuda.max_memory_allocated()


class NaiveSwap:
    """The usual hand-rolled block swap, as a block streamer (baseline only: it breaks every rule
    placement.py exists for, and re-allocates host memory on every move)."""

    def __init__(self, device):
        self.device, self.model, self.bytes = device, None, 0

    def begin_forward(self, model):
        self.model = model

    def before_block(self, i):
        block = self.model.blocks[i].to(self.device)
        for p in block.parameters():
            p.data = p.data.contiguous()
        self.bytes += module_bytes(block)

    def after_block(self, i):
        self.model.blocks[i].to("cpu")

    def end_forward(self, ok):
        self.model = None


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()
    empty_host = getattr(torch._C, "_host_emptyCache", None)
    if empty_host is not None:
        empty_host()


def run_ours(cfg, cases, device, results, notes, deadline, skip_naive=False):
    model = build_ours(cfg, device, notes)
    block_bytes = [module_bytes(b) for b in model.blocks]
    results["model"] = {"blocks": cfg.num_layers, "block_bytes": block_bytes[0],
                        "non_block_bytes": module_bytes(model) - sum(block_bytes),
                        "total_bytes": module_bytes(model)}
    for case in cases:
        args = make_inputs(cfg, case, device)
        ms, peak = time_forwards(lambda: model(**args))
        results["cases"][case]["resident"] = {"ms": ms, "peak_vram_bytes": peak}
        del args
    if time.time() > deadline:
        notes.append("budget spent after resident: swap variants skipped")
        return
    t0 = time.time()
    swap = BlockSwap(cfg.num_layers, device, prefetch=1, release_after_run=True).attach(model)
    torch.cuda.synchronize()
    results["model"]["attach_seconds"] = time.time() - t0
    results["model"]["vram_after_attach_bytes"] = torch.cuda.memory_allocated()
    for depth in (1, 2):
        swap.set_prefetch(depth)
        for case in cases:
            args = make_inputs(cfg, case, device)
            swap.reset_stats()
            ms, peak = time_forwards(lambda: model(**args), timed=2)
            s = swap.stats()
            resident = results["cases"][case]["resident"]["ms"]
            results["cases"][case][f"ours_depth{depth}"] = {
                "ms": ms, "ratio_to_resident": ms / resident, "peak_vram_bytes": peak,
                "bytes_moved_per_forward": s["bytes_moved"] // 3,
                "copy_ms_per_forward": s["copy_ms"] / 3, "wait_ms_per_forward": s["wait_ms"] / 3,
                "blocks_swapped": s["blocks_swapped"]}
            del args
    swap.detach(model)           # host master views stay the parameters (blocks on the host)
    del swap
    if skip_naive:
        return
    if time.time() > deadline:
        notes.append("budget spent after ours: naive skipped")
        return
    naive = NaiveSwap(device)
    model.block_streamer = naive
    for case in cases:
        args = make_inputs(cfg, case, device)
        naive.bytes = 0
        ms, peak = time_forwards(lambda: model(**args), timed=1)   # ~1 s a block: budget
        resident = results["cases"][case]["resident"]["ms"]
        results["cases"][case]["naive"] = {"ms": ms, "ratio_to_resident": ms / resident,
                                           "peak_vram_bytes": peak,
                                           "bytes_moved_per_forward": naive.bytes // 2,
                                           "note": "1 warmup + 1 timed forward (time budget); "
                                                   "plus as many bytes device->host per forward"}
        del args
        if time.time() > deadline:
            notes.append("budget spent during naive")
            break
    model.block_streamer = None


def build_diffusers(cfg, device, notes):
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights(include_buffers=False):
        ref = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim, in_channels=cfg.in_dim, out_channels=cfg.out_dim,
            text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
            eps=cfg.eps, image_dim=cfg.clip_dim, added_kv_proj_dim=cfg.dim, rope_max_seq_len=1024)
    for name, p in list(ref.named_parameters()):
        owner, _, leaf = name.rpartition(".")
        mod = ref.get_submodule(owner) if owner else ref
        mod._parameters[leaf] = nn.Parameter(random_like(tuple(p.shape), torch.bfloat16, device),
                                             requires_grad=False)
    for name, b in list(ref.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        mod = ref.get_submodule(owner) if owner else ref
        mod._buffers[leaf] = b.to(device)
    add_audio_layers(ref.blocks, cfg.dim, device, [])
    return ref.eval().requires_grad_(False)


def run_diffusers(cfg, cases, device, results, notes, deadline):
    try:
        from diffusers.hooks import apply_group_offloading
    except Exception as exc:  # noqa: BLE001 - any import problem means "not available here"
        notes.append(f"diffusers group offloading skipped: diffusers not importable ({exc})")
        return
    ref = build_diffusers(cfg, device, notes)

    def call(args):
        hidden = torch.cat([args["x"], args["y"]], dim=1)
        return ref(hidden_states=hidden, timestep=args["t"], encoder_hidden_states=args["context"],
                   encoder_hidden_states_image=args["clip_fea"], return_dict=False)[0]

    for case in cases:
        args = make_inputs(cfg, case, device)
        ms, peak = time_forwards(lambda: call(args))
        results["cases"][case]["diffusers_resident"] = {"ms": ms, "peak_vram_bytes": peak}
        del args
    if time.time() > deadline:
        notes.append("budget spent: diffusers group offloading skipped")
        return
    block_bytes = sum(module_bytes(b) for b in ref.blocks)
    apply_group_offloading(ref, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=1, use_stream=True)
    for case in cases:
        args = make_inputs(cfg, case, device)
        ms, peak = time_forwards(lambda: call(args))
        own = results["cases"][case]["diffusers_resident"]["ms"]
        results["cases"][case]["diffusers_group"] = {
            "ms": ms, "ratio_to_diffusers_resident": ms / own,
            "ratio_to_our_resident": ms / results["cases"][case]["resident"]["ms"],
            "peak_vram_bytes": peak, "bytes_moved_per_forward": block_bytes,
            "note": "bytes = block parameters (estimate); no copy/wait timing exposed"}
        del args


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print the result as one JSON object")
    ap.add_argument("--out", help="also write the JSON to this file")
    ap.add_argument("--blocks", type=int, default=40)
    ap.add_argument("--cases", default="81,33", help="comma list of: " + ",".join(CASES))
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="start no new variant after this many seconds")
    ap.add_argument("--skip", default="", help="comma list of: naive,diffusers")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA device"}))
        return 2
    t0 = time.time()
    deadline = t0 + args.budget_s
    device = torch.device("cuda")
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        ap.error(f"unknown case(s) {unknown}; choose from {list(CASES)}")
    cfg = config(args.blocks)
    skip = set(filter(None, args.skip.split(",")))
    notes = []
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "dtype": "bf16", "config": cfg.summary(), "notes": notes,
               "cases": {c: {"name": CASES[c][0], "tokens": tokens_of(c)} for c in cases}}
    if "naive" in skip:
        notes.append("naive skipped by --skip")
    run_ours(cfg, cases, device, results, notes, deadline, skip_naive="naive" in skip)
    free_memory()
    if "diffusers" in skip:
        notes.append("diffusers skipped by --skip")
    elif time.time() > deadline:
        notes.append("budget spent: diffusers skipped")
    else:
        run_diffusers(cfg, cases, device, results, notes, deadline)
    results["total_seconds"] = time.time() - t0
    text = json.dumps(results, indent=1 if not args.json else None)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
