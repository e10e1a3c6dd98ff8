"""Warp counts of the fused norm kernels (wanvideo/fused_ops.py), GPU only; prints one JSON
object.

    python bench/norm_warps.py [--tokens 32760] [--rounds 3] [--out FILE]

Each LayerNorm / residual variant the model runs, the RMSNorm without rotation (fp32 residual of 5,120 channels, bf16 branch
output, [1, 1, C] modulation and gate), the RMSNorm and the RMSNorm + RoPE kernel with either
rotation path (one cos/sin row for all heads, or a lookup per channel pair), and the fp8 row
quantizer, timed at 2 / 4 / 8 / 16 warps by patching the choice (fused_ops._norm_warps,
_rope_plan, quant_kernels._rows_warps). Per variant and warp count:
the fastest of `rounds` means of 30 calls (CUDA events), ms; "chosen" is the count the current
rule picks.
"""
from __future__ import annotations

import argparse

import torch

from common import cuda_ms, emit, patched  # noqa: E402

from wanvideo_infinitetalk.wanvideo import fused_ops  # noqa: E402
from wanvideo_infinitetalk.wanvideo.rope import (angle_table, cos_sin, grid_angles,  # noqa: E402
                                                 rotations)

WARPS = (2, 4, 8, 16)
DIM, HEADS = 5120, 40


def variants(tokens: int) -> dict:
    """name: (call, fp8_rows) for the LayerNorm kernel's variants."""
    bf16 = torch.bfloat16
    x = torch.randn(1, tokens, DIM, device="cuda")
    xi = x.clone()   # updated in place (values drift; timing only)
    y = torch.randn(1, tokens, DIM, device="cuda").to(bf16)
    w, b = torch.ones(DIM, device="cuda"), torch.zeros(DIM, device="cuda")
    mod = torch.randn(1, 6, DIM, device="cuda")
    shift, scale, gate = mod[:, 0:1], mod[:, 1:2], mod[:, 2:3]
    acc = torch.zeros(1, device="cuda")
    rln = fused_ops.residual_layer_norm
    return {
        "modulated_fp8_rows": (lambda: fused_ops.modulated_layer_norm(
            x, shift, scale, bf16, 1e-6, fp8_rows=True), True),
        "gated_residual_affine_fp8_rows": (lambda: rln(
            x, y, gate, bf16, 1e-6, w, b, inplace=False, fp8_rows=True), True),
        "residual_modulated_fp8_rows": (lambda: rln(
            x, y, None, bf16, 1e-6, shift=shift, scale=scale, inplace=False, fp8_rows=True), True),
        "modulated_bf16": (lambda: fused_ops.modulated_layer_norm(x, shift, scale, bf16, 1e-6),
                           False),
        "gated_residual_affine_bf16": (lambda: rln(x, y, gate, bf16, 1e-6, w, b, inplace=False),
                                       False),
        "residual_affine_in_place_bf16": (lambda: rln(xi, y, None, bf16, 1e-6, w, b), False),
        "modulated_tensor_scale": (lambda: fused_ops.modulated_layer_norm(
            x, shift, scale, bf16, 1e-6, amax_to=acc), False),
        "gated_residual": (lambda: fused_ops.gated_residual_(xi, y, gate), False),
        "rms_norm": (lambda: fused_ops.rms_norm(y, w, 1e-6), False),
    }


def fastest(call, patches_for, rounds: int) -> dict:
    """{warps: ms}: the fastest of `rounds` means of 30 calls of `call` under patches_for(warps),
    the warp counts alternating within each round."""
    times = {}
    for _ in range(rounds):
        for warps in WARPS:
            with patched(patches_for(warps)):
                ms = cuda_ms(call, 30)
            times[warps] = min(times.get(warps, ms), ms)
    return times


def sweep_norms(tokens: int, rounds: int) -> dict:
    def patches(warps):
        return [(fused_ops, "_norm_warps", lambda block, rows: warps)]

    return {name: {"ms": fastest(call, patches, rounds),
                   "chosen": fused_ops._norm_warps(8192, rows)}
            for name, (call, rows) in variants(tokens).items()}


def sweep_row_quantizer(tokens: int, rounds: int) -> dict:
    """quant_kernels.quantize_rows_triton as the fp8 layers call it: o's 5,120-wide input, and
    ffn.2's 13,824-wide one with the GELU."""
    from wanvideo_infinitetalk.wanvideo import quant_kernels

    def patches(warps):
        return [(quant_kernels, "_rows_warps", lambda block: warps)]

    out = {}
    for name, (width, gelu) in {"row_quantizer_5120": (DIM, False),
                                "row_quantizer_gelu_13824": (13824, True)}.items():
        x = torch.randn(tokens, width, device="cuda").bfloat16()
        out[name] = {"ms": fastest(lambda: quant_kernels.quantize_rows_triton(x, gelu), patches,
                                   rounds),
                     "chosen": quant_kernels._rows_warps(1 << (width - 1).bit_length())}
    return out


def sweep_rms(tokens: int, rounds: int) -> dict:
    head_dim = DIM // HEADS
    x = torch.randn(1, tokens, DIM, device="cuda").bfloat16()
    weight = torch.ones(DIM, device="cuda")
    cos, sin = cos_sin(rotations(grid_angles(angle_table(head_dim), (21, 30, 52), head_dim),
                                 "cuda")[:tokens])
    out = {}
    for name, hh in {"rms_norm_rope_per_head_table": head_dim // 2,
                     "rms_norm_rope_lookup_per_pair": 0}.items():
        def patches(warps, hh=hh):
            return [(fused_ops, "_rope_plan", lambda block, half: (hh, warps))]

        out[name] = {"ms": fastest(lambda: fused_ops.rms_norm_rope(x, weight, 1e-6, cos, sin,
                                                                   HEADS), patches, rounds),
                     "chosen": fused_ops._rope_plan(8192, head_dim // 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    emit({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
          "dim": DIM, **sweep_norms(args.tokens, args.rounds),
          **sweep_rms(args.tokens, args.rounds),
          **sweep_row_quantizer(args.tokens, args.rounds)}, args.out)


if __name__ == "__main__":
    main()
