"""Quantized weights on a 14B-shaped WanModel stack (GPU only; prints one JSON object).

    python bench/quant.py --json [--blocks 8] [--tokens 32760 8100] [--iters 3] [--out FILE]
                         [--attention int8[,int8@N...]]

Variants, each resident on the GPU and with BlockSwap of all blocks (weights in pinned host RAM):
bf16; fp8 e4m3 scaled through `_scaled_mm` (per-tensor input quantization) with fast accumulation
(the default, fp8_matmul="fast") and with fp32 accumulation ("accurate"); the same fp8 weights
through the dequantize path; NVFP4 dequantized per layer then a bf16 GEMM. The model is our real
WanModel (dim 5120, ffn 13824, 40 heads, I2V, InfiniteTalk layers present but not driven: no
audio input) with identical random weights in every variant. Times are ms per full forward
(CUDA events); cosine is against the bf16 output of the same input. `--attention` sets the
attention backend of every variant except bf16, which stays the SDPA reference (e.g. `--attention
int8 --variants bf16,fp8_scaled_mm`: fp8 weights + 8-bit attention against plain bf16). Several
comma-separated backends time each non-bf16 variant once per backend, keyed "variant+backend";
"int8@N" runs the 8-bit kernel with launch settings attention_int8.SWEEP[N] (a candidate default
against the current one in the same run).
"""
from __future__ import annotations

import argparse
import gc

import torch

from common import attention_spec, build, emit  # noqa: E402

from wanvideo_infinitetalk.wanvideo.block_swap import BlockSwap  # noqa: E402

LATENTS = {32760: (21, 60, 104), 8100: (9, 60, 60)}  # tokens -> latent F, H, W (patch 1x2x2)
VARIANTS = {  # name: (quant format, quantize_model kwargs)
    "bf16": ("none", {}),
    "fp8_scaled_mm": ("fp8_e4m3fn_scaled", {"fp8_matmul": "fast"}),
    "fp8_scaled_mm_accurate": ("fp8_e4m3fn_scaled", {"fp8_matmul": "accurate"}),
    "fp8_dequant": ("fp8_e4m3fn_scaled", {"fp8_matmul": "dequantize"}),
    "nvfp4_dequant": ("nvfp4", {}),
}


def inputs(tokens: int):
    f, h, w = LATENTS[tokens]
    g = torch.Generator(device="cuda").manual_seed(tokens)
    return dict(x=torch.randn(1, 16, f, h, w, device="cuda", generator=g),
                t=torch.tensor([700.0], device="cuda"),
                context=torch.randn(1, 512, 4096, device="cuda", generator=g).bfloat16(),
                clip_fea=torch.randn(1, 257, 1280, device="cuda", generator=g).bfloat16(),
                y=torch.randn(1, 20, f, h, w, device="cuda", generator=g))


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for n, t in
               list(model.named_parameters()) + list(model.named_buffers()) if n.startswith("blocks."))


def time_forward(model, args_, iters: int, warmup: int):
    with torch.no_grad():
        for _ in range(warmup):
            out = model(**args_)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            out = model(**args_)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, out


def scaled_mm_calls(model) -> int:
    return sum(getattr(m, "scaled_mm_calls", 0) for m in model.modules())


def run_variant(name, blocks, tokens_list, iters, warmup, reference, swapped, attention="sdpa"):
    fmt, kwargs = VARIANTS[name]
    model = build(blocks, fmt, storage="cpu" if swapped else "cuda", **kwargs)
    model.set_attention("sdpa" if name == "bf16" else attention)
    swap = BlockSwap(blocks_to_swap=blocks, device="cuda", prefetch=1).attach(model) if swapped else None
    result = {"weight_bytes": weight_bytes(model)}
    for tokens in tokens_list:
        args_ = inputs(tokens)
        torch.cuda.reset_peak_memory_stats()
        calls0 = scaled_mm_calls(model)
        ms, out = time_forward(model, args_, iters, warmup)
        entry = {"ms": ms, "peak_vram_bytes": torch.cuda.max_memory_allocated(),
                 "scaled_mm_calls": scaled_mm_calls(model) - calls0}
        key = tokens
        if name == "bf16" and not swapped:
            reference[key] = out.float().cpu()
        elif key in reference:
            entry["cosine_vs_bf16"] = torch.nn.functional.cosine_similarity(
                out.float().cpu().flatten(), reference[key].flatten(), dim=0).item()
        if swap is not None:
            entry["block_swap"] = {k: v for k, v in swap.stats().items()
                                   if k in ("bytes_moved", "copy_ms", "wait_ms", "forwards")}
            swap.reset_stats()
        result[str(tokens)] = entry
        del out, args_
    if swap is not None:
        swap.detach(model)
        swap.release()
    del model, swap
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32760, 8100])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--attention", default="sdpa",
                    help="attention backend(s) of the non-bf16 variants, comma-separated")
    args = ap.parse_args(argv)
    reference: dict = {}
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "blocks": args.blocks, "tokens": args.tokens, "attention": args.attention,
               "resident": {}, "swapped_all": {}}
    specs = args.attention.split(",")
    for name in args.variants.split(","):
        for spec in ["sdpa"] if name == "bf16" else specs:
            key = name if name == "bf16" or len(specs) == 1 else f"{name}+{spec}"
            with attention_spec(spec) as backend:
                for mode, swapped in (("resident", False), ("swapped_all", True)):
                    results[mode][key] = run_variant(name, args.blocks, args.tokens, args.iters,
                                                     args.warmup, reference, swapped, backend)
    base = results["resident"].get("bf16")
    for mode in ("resident", "swapped_all"):
        for name, res in results[mode].items():
            for tokens in args.tokens:
                entry = res[str(tokens)]
                if base:
                    entry["speedup_vs_bf16_resident"] = base[str(tokens)]["ms"] / entry["ms"]
                resident = results["resident"].get(name, {}).get(str(tokens))
                if mode == "swapped_all" and resident:
                    entry["ratio_to_same_format_resident"] = entry["ms"] / resident["ms"]
    emit(results, args.out)


if __name__ == "__main__":
    main()
