"""Quantized-linear benchmark on a 14B-shaped block stack (GPU only; prints one JSON object).

python -m bench.quant --json [--blocks 8] [--tokens 32760 8100] [--iters 3]

Variants: bf16, fp8 scaled_mm (fused input quantization), fp8 dequant, NVFP4 dequant (compiled).
The blocks are a stand-in with the Wan2.1 14B block's Linear shapes (dim 5120, ffn 13824, 40 heads;
self-attn q,k,v,o; cross-attn q,k,v,o,k_img,v_img over 512 text + 257 image tokens; ffn) and
SDPA attention; random weights. Times are ms per forward of the whole stack (CUDA events).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pack():
    sys.path.insert(0, os.path.join(ROOT, "wanvideo"))
    import _pack  # type: ignore
    sys.path.pop(0)
    _pack.load_pack()
    return _pack.import_in_pack("fp8_optimization")


class Attn(nn.Module):
    def __init__(self, dim, heads, img=False):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        if img:
            self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def _sdpa(self, q, k, v):
        b, h = q.shape[0], self.heads
        q, k, v = (t.view(b, -1, h, t.shape[-1] // h).transpose(1, 2) for t in (q, k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, h * q.shape[-1])

    def forward(self, x, ctx=None, img=None):
        src = x if ctx is None else ctx
        out = self._sdpa(self.q(x), self.k(src), self.v(src))
        if img is not None:
            out = out + self._sdpa(self.q(x), self.k_img(img), self.v_img(img))
        return self.o(out)


class Block(nn.Module):
    def __init__(self, dim=5120, ffn=13824, heads=40):
        super().__init__()
        self.self_attn, self.cross_attn = Attn(dim, heads), Attn(dim, heads, img=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(approximate="tanh"), nn.Linear(ffn, dim))

    def forward(self, x, ctx, img):
        n = x.shape[-1:]
        x = x + self.self_attn(F.layer_norm(x, n))
        x = x + self.cross_attn(F.layer_norm(x, n), ctx, img)
        return x + self.ffn(F.layer_norm(x, n))


class Stack(nn.Module):
    def __init__(self, blocks):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(blocks))

    def forward(self, x, ctx, img):
        for b in self.blocks:
            x = b(x, ctx, img)
        return x


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def time_forward(model, inputs, warmup, iters):
    with torch.no_grad():
        for _ in range(warmup):
            model(*inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        resident = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            out = model(*inputs)
        end.record()
        torch.cuda.synchronize()
    return start.elapsed_time(end) / iters, torch.cuda.max_memory_allocated(), resident, out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--blocks", type=int, default=8)
    ap.add_argument("--tokens", type=int, nargs="+", default=[32760, 8100])
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"error": "needs a CUDA device"}))
        return 1
    fo = _pack()
    torch.manual_seed(0)
    dev = torch.device("cuda")
    with torch.device(dev):
        base = Stack(args.blocks).to(torch.bfloat16).eval()
    variants = {"bf16": None, "fp8_scaled_mm": ("fp8_e4m3fn_scaled", True),
                "fp8_dequant": ("fp8_e4m3fn_scaled", False), "nvfp4_dequant": ("nvfp4", True)}
    result = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability()),
              "torch": torch.__version__, "blocks": args.blocks, "dim": 5120, "ffn": 13824, "heads": 40,
              "block": "stand-in with Wan2.1 14B Linear shapes (no modulation/RoPE/audio)",
              "results": {}}
    ref_out = {}
    for name, spec in variants.items():
        model = base if spec is None else copy.deepcopy(base)
        if spec is not None:
            fo.quantize_model(model, spec[0], dev, allow_scaled_mm=spec[1])
        entry = {"weight_bytes": weight_bytes(model)}
        if spec is not None:
            entry["paths"] = fo.quant_report(model)["paths"]
        for tokens in args.tokens:
            g = torch.Generator(device=dev).manual_seed(1)
            inputs = (torch.randn(1, tokens, 5120, device=dev, generator=g, dtype=torch.bfloat16),
                      torch.randn(1, 512, 5120, device=dev, generator=g, dtype=torch.bfloat16),
                      torch.randn(1, 257, 5120, device=dev, generator=g, dtype=torch.bfloat16))
            ms, peak, resident, out = time_forward(model, inputs, args.warmup, args.iters)
            # peak includes the bf16 reference stack kept resident for the cosine check;
            # peak_over_resident is what this variant's forward adds on top.
            rec = {"ms_per_forward": round(ms, 2), "peak_vram_bytes": peak,
                   "peak_over_resident_bytes": peak - resident}
            if spec is None:
                ref_out[tokens] = out.float()
            else:
                rec["cosine_vs_bf16"] = round(F.cosine_similarity(
                    out.float().flatten(), ref_out[tokens].flatten(), dim=0).item(), 5)
            entry[str(tokens)] = rec
            del out, inputs
        if spec is not None:
            entry["scaled_mm_calls"] = sum(getattr(m, "scaled_mm_calls", 0) for m in model.modules())
            del model
        torch.cuda.empty_cache()
        result["results"][name] = entry
    bf = result["results"]["bf16"]
    for name, entry in result["results"].items():
        for tokens in args.tokens:
            entry[str(tokens)]["speedup_vs_bf16"] = round(
                bf[str(tokens)]["ms_per_forward"] / entry[str(tokens)]["ms_per_forward"], 3)
    print(json.dumps(result, indent=None if args.json else 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
