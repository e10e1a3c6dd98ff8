"""Where the fp8 linear's time goes on this GPU, and what fast accumulation costs in accuracy
(prints one JSON object).

    python bench/fp8_gemm.py --json [--tokens 32760]

For the three linear shapes of a 14B block: bf16 F.linear; `_scaled_mm` with tensor-wise scales
(fp32 accumulation and fast accumulation) and row-wise scales (GEMM only, both accumulations);
the pack's per-tensor activation quantization (reduction + cast) and its one-pass per-row one. Errors are relative to the exact fp32 product of the same fp8
operands, so they measure the GEMM's accumulation and bf16 output rounding only.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import cuda_ms, emit  # noqa: E402  (also loads the pack)

from wanvideo_infinitetalk.wanvideo.quant_kernels import (  # noqa: E402
    quantize_rows_triton, quantize_tensor_triton)

SHAPES = {"qkvo 5120->5120": (5120, 5120), "ffn.0 5120->13824": (5120, 13824),
          "ffn.2 13824->5120": (13824, 5120)}


def _errors(out: torch.Tensor, exact: torch.Tensor) -> dict:
    diff = out.float() - exact
    return {"rel_l2": (diff.norm() / exact.norm()).item(),
            "max_abs_over_max_ref": (diff.abs().max() / exact.abs().max()).item()}


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--tokens", type=int, default=32760)
    args = ap.parse_args(argv)
    m = args.tokens
    out = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "tokens": m, "shapes": {}}
    for name, (k, n) in SHAPES.items():
        g = torch.Generator(device="cuda").manual_seed(k + n)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
        w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).bfloat16()
        b = torch.zeros(n, device="cuda", dtype=torch.bfloat16)
        wq = w.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        xq, sx = quantize_tensor_triton(x, None)
        sx_row = (x.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
        xq_row = (x.float() / sx_row).to(torch.float8_e4m3fn)
        sw_row = torch.ones((1, n), device="cuda")

        def tensorwise(fast):
            return lambda: torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=one, bias=b,
                                            out_dtype=torch.bfloat16, use_fast_accum=fast)
        flops = 2 * m * k * n
        r = {
            "bf16_linear_ms": cuda_ms(lambda: F.linear(x, w, b)),
            "scaled_mm_tensorwise_ms": cuda_ms(tensorwise(False)),
            "scaled_mm_tensorwise_fast_accum_ms": cuda_ms(tensorwise(True)),
            "scaled_mm_rowwise_ms": cuda_ms(lambda: torch._scaled_mm(
                xq_row, wq.t(), scale_a=sx_row, scale_b=sw_row, bias=b, out_dtype=torch.bfloat16)),
            # what the pack runs for inputs written per row (quant_linear.fp8_rows_input)
            "scaled_mm_rowwise_fast_accum_ms": cuda_ms(lambda: torch._scaled_mm(
                xq_row, wq.t(), scale_a=sx_row, scale_b=sw_row, bias=b, out_dtype=torch.bfloat16,
                use_fast_accum=True)),
            "quantize_tensor_ms": cuda_ms(lambda: quantize_tensor_triton(x, None)),
            "quantize_rows_ms": cuda_ms(lambda: quantize_rows_triton(x)),
        }
        exact = (xq.float() * sx) @ wq.float().t()
        r["error_fp32_accum"] = _errors(tensorwise(False)(), exact)
        r["error_fast_accum"] = _errors(tensorwise(True)(), exact)
        del exact
        r["bf16_tflops"] = flops / r["bf16_linear_ms"] / 1e9
        r["fast_accum_gemm_speedup_vs_fp32_accum"] = (r["scaled_mm_tensorwise_ms"]
                                                      / r["scaled_mm_tensorwise_fast_accum_ms"])
        r["tensorwise_total_speedup"] = r["bf16_linear_ms"] / (r["scaled_mm_tensorwise_ms"]
                                                               + r["quantize_tensor_ms"])
        r["tensorwise_fast_accum_total_speedup"] = r["bf16_linear_ms"] / (
            r["scaled_mm_tensorwise_fast_accum_ms"] + r["quantize_tensor_ms"])
        r["rowwise_gemm_speedup"] = r["bf16_linear_ms"] / r["scaled_mm_rowwise_ms"]
        out["shapes"][name] = r
        del x, w, xq, xq_row
        torch.cuda.empty_cache()
    emit(out, None)


if __name__ == "__main__":
    main()
