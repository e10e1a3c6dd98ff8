"""Fused elementwise kernels (wanvideo/fused_ops.py) on and off (GPU only; prints one JSON object).

    python bench/fused_ops.py [--blocks 4] [--tokens 32760] [--iters 5] [--out FILE]

ops: each fused kernel against the torch chain it replaces, on one [1, tokens, 5120] activation
(ms per call, CUDA events; the residual cases update an fp32 residual by a bf16 y, gated by an
fp32 [1, 1, C] gate or not, and the *_layer_norm ones also write the next norm in bf16;
rms_norm_rope_into_exchange: q or k written into the Ulysses send buffer of 2 ranks and 2 pieces
directly, against the token-major result packed by head_exchange.pack).
forward: ms per full forward of a 14B-shaped WanModel (bench/common.py, weights resident) in bf16
and fp8_e4m3fn_scaled, WANVIDEO_FUSED=0 vs 1 on the same model and input, and the cosine between
the two outputs; "norms_only" is WANVIDEO_FUSED=1 with the residual updates back in torch (the
fused norm kernels alone, as before the residual kernels existed).
"""
from __future__ import annotations

import argparse
import gc
import os

import torch
import torch.nn.functional as F

from common import build, cuda_ms, emit  # noqa: E402
from quant import LATENTS, inputs  # noqa: E402

from wanvideo_infinitetalk.wanvideo import fused_ops, head_exchange  # noqa: E402
from wanvideo_infinitetalk.wanvideo.rope import (angle_table, apply_rope, cos_sin,  # noqa: E402
                                                 grid_angles, rotations)


def bench_ops(tokens: int, iters: int, dim: int = 5120, heads: int = 40) -> dict:
    f, h, w = LATENTS[tokens]
    grid = (f, h // 2, w // 2)  # patch 1x2x2
    head_dim = dim // heads
    x = torch.randn(1, tokens, dim, device="cuda").bfloat16()
    resid = torch.randn(1, tokens, dim, device="cuda")
    w = torch.ones(dim, device="cuda")
    mod = torch.randn(1, 6, dim, device="cuda")
    shift, scale = mod.chunk(6, dim=1)[:2]
    rot = rotations(grid_angles(angle_table(head_dim), grid, head_dim), "cuda")
    cos, sin = cos_sin(rot)
    shape = (1, tokens, heads, head_dim)
    cases = {
        "rms_norm_rope": (
            lambda: apply_rope(F.rms_norm(x.float(), (dim,), w, 1e-6).to(x.dtype).view(shape), rot),
            lambda: fused_ops.rms_norm_rope(x, w, 1e-6, cos, sin, heads)),
        "modulated_layer_norm": (
            lambda: torch.addcmul(shift, F.layer_norm(resid, (dim,), eps=1e-6), 1 + scale).bfloat16(),
            lambda: fused_ops.modulated_layer_norm(resid, shift, scale, torch.bfloat16, 1e-6)),
        "affine_layer_norm": (
            lambda: F.layer_norm(resid, (dim,), w, w, 1e-6).bfloat16(),
            lambda: fused_ops.layer_norm(resid, w, w, 1e-6, torch.bfloat16)),
    }
    gate = mod.chunk(6, dim=1)[2]
    xr = resid.clone()  # updated in place by the residual cases (values drift; timing only)

    def ln_mod(t):
        return torch.addcmul(shift, F.layer_norm(t, (dim,), eps=1e-6), 1 + scale).bfloat16()

    cases.update({
        "gated_residual": (lambda: xr.addcmul_(x, gate),
                           lambda: fused_ops.gated_residual_(xr, x, gate)),
        "residual": (lambda: xr.add_(x), lambda: fused_ops.gated_residual_(xr, x)),
        "gated_residual_affine_layer_norm": (  # after self-attention: new x + norm3
            lambda: (lambda n: (n, F.layer_norm(n, (dim,), w, w, 1e-6).bfloat16()))(
                torch.addcmul(resid, x, gate)),
            lambda: fused_ops.residual_layer_norm(resid, x, gate, torch.bfloat16, 1e-6, w, w,
                                                  inplace=False)),
        "residual_modulated_layer_norm": (  # after cross-attention: x += y, norm2 modulated
            lambda: (xr, ln_mod(xr.add_(x))),
            lambda: fused_ops.residual_layer_norm(xr, x, None, torch.bfloat16, 1e-6,
                                                  shift=shift, scale=scale)),
    })
    # q or k of a rank under sequence parallelism (2 ranks, 2 pieces), rank 0's heads into its
    # receive buffer: normed and rotated, then packed (the chain), or written there directly
    buf = (2, 3, 2, 1, tokens, heads // 4, head_dim)
    ref_bufs, fused_bufs = ([torch.zeros(buf, dtype=x.dtype, device="cuda") for _ in "ab"]
                            for _ in "ab")
    cases["rms_norm_rope_into_exchange"] = (
        lambda: head_exchange.pack((fused_ops.rms_norm_rope(x, w, 1e-6, cos, sin, heads)
                                    .view(shape),), ref_bufs[0], own=ref_bufs[1], me=0),
        lambda: fused_ops.rms_norm_rope(x, w, 1e-6, cos, sin, heads,
                                        exchange=(*fused_bufs, 0, 0)))
    out = {}
    for name, (ref, fused) in cases.items():
        torch_ms, fused_ms = cuda_ms(ref, iters), cuda_ms(fused, iters)
        xr.copy_(resid)
        a = fused()
        a = [t.float().clone() for t in (a if isinstance(a, tuple) else [a])]
        xr.copy_(resid)
        b = ref()
        b = [t.float() for t in (b if isinstance(b, tuple) else [b])]
        err = max((u.flatten() - v.flatten()).abs().max().item() for u, v in zip(a, b))
        out[name] = {"torch_ms": torch_ms, "fused_ms": fused_ms, "speedup": torch_ms / fused_ms,
                     "max_abs_diff": err}
    nbytes = {"rms_norm_rope": 4, "rms_norm_rope_into_exchange": 4, "modulated_layer_norm": 6,
              "affine_layer_norm": 6, "gated_residual": 10, "residual": 10, "gated_residual_affine_layer_norm": 12,
              "residual_modulated_layer_norm": 12}
    for name, per in nbytes.items():  # one read + one write: bytes per element
        out[name]["fused_GBps"] = tokens * dim * per / out[name]["fused_ms"] / 1e6
    return out


class _ResidualInTorch:
    """fused_ops' residual entry points done as torch ops + the separate fused norm kernels."""

    @staticmethod
    def residual_layer_norm(x, y, gate, out_dtype, eps=1e-6, weight=None, bias=None, shift=None,
                            scale=None, inplace=True, norm=True, **out_kw):
        if inplace:
            x = x.addcmul_(y, gate) if gate is not None else x.add_(y)
        else:
            x = torch.addcmul(x, y, gate) if gate is not None else x + y
        if shift is not None:
            return x, fused_ops.modulated_layer_norm(x, shift, scale, out_dtype, eps, **out_kw)
        # the affine norm with amax_to / fp8_rows has no public entry of its own
        return x, fused_ops._launch_ln(x, out_dtype, eps, weight, bias, False, **out_kw)

    @staticmethod
    def gated_residual_(x, y, gate=None):
        return x.addcmul_(y, gate) if gate is not None else x.add_(y)


def bench_forward(fmt: str, blocks: int, tokens: int, iters: int, warmup: int) -> dict:
    model = build(blocks, fmt, storage="cuda")
    args_ = inputs(tokens)
    result, outs = {}, {}
    with torch.no_grad():
        for key in ("unfused", "fused", "norms_only") * 2:  # interleaved: each timed twice
            os.environ["WANVIDEO_FUSED"] = "0" if key == "unfused" else "1"
            real = {n: getattr(fused_ops, n) for n in ("residual_layer_norm", "gated_residual_")}
            if key == "norms_only":
                for n in real:
                    setattr(fused_ops, n, getattr(_ResidualInTorch, n))
            try:
                ms = cuda_ms(lambda: model(**args_), iters, warmup)
                outs[key] = model(**args_).float()
            finally:
                for n, f in real.items():
                    setattr(fused_ops, n, f)
            result.setdefault(key + "_ms_runs", []).append(ms)
    for key in ("fused", "unfused", "norms_only"):
        result[key + "_ms"] = min(result[key + "_ms_runs"])
    result["speedup"] = result["unfused_ms"] / result["fused_ms"]
    result["speedup_vs_norms_only"] = result["norms_only_ms"] / result["fused_ms"]
    result["saved_ms_per_block"] = (result["unfused_ms"] - result["fused_ms"]) / blocks
    result["cosine_fused_vs_unfused"] = F.cosine_similarity(
        outs["fused"].flatten(), outs["unfused"].flatten(), dim=0).item()
    result["cosine_norms_only_vs_unfused"] = F.cosine_similarity(
        outs["norms_only"].flatten(), outs["unfused"].flatten(), dim=0).item()
    del model, outs, args_
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out")
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32760, choices=sorted(LATENTS))
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--formats", default="none,fp8_e4m3fn_scaled")
    args = ap.parse_args(argv)
    saved = os.environ.get("WANVIDEO_FUSED")
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
               "blocks": args.blocks, "tokens": args.tokens, "iters": args.iters}
    try:
        import triton
        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    results["ops"] = bench_ops(args.tokens, 20)
    results["forward"] = {fmt: bench_forward(fmt, args.blocks, args.tokens, args.iters, args.warmup)
                          for fmt in args.formats.split(",")}
    fwd = results["forward"]
    if {"none", "fp8_e4m3fn_scaled"} <= set(fwd):
        results["fp8_over_bf16_fused"] = fwd["fp8_e4m3fn_scaled"]["fused_ms"] / fwd["none"]["fused_ms"]
    if saved is None:
        os.environ.pop("WANVIDEO_FUSED", None)
    else:
        os.environ["WANVIDEO_FUSED"] = saved
    emit(results, args.out)


if __name__ == "__main__":
    main()
