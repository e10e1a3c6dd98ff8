"""QuantLinear: an nn.Linear replacement holding fp8 or NVFP4 weights.

Every quantized tensor (weight, scales) is a registered buffer in fresh aligned storage (made by
placement.fresh_copy), so BlockSwap, `.to()` and the layout checker see it like any other tensor.
Buffers, not parameters: placement.move_module casts floating *parameters* to the base dtype,
which must never happen to an fp8 weight. The bias stays a parameter in the compute dtype.

The compute path is chosen once, when the layer is built for its compute device (`path`):
- "scaled_mm": fp8 e4m3 weight on CUDA capability >= (8, 9) with K and N multiples of 16.
  The activation is quantized per tensor (a Triton amax pass that writes the scale, then one
  cast pass; a torch.compile'd function when Triton is missing), or with the file's calibrated
  input_scale. `fast_accum` (default on) lets the GEMM keep its sums in the tensor cores'
  accumulator instead of promoting them to fp32 every few K steps: on an H100 it made the fp8
  GEMMs up to 10% faster for an output error (~2e-3 relative) well under what the fp8 rounding
  of the inputs already costs (bench/fp8_gemm.py, bench/quant.py). `scaled_mm_calls` counts
  calls (a plain int; tests spy on it).
- "dequant": fp8 weight cast to the activation dtype once per call, scale applied in place on
  that temporary, then a normal GEMM (CPU, older GPUs, e5m2, shapes the kernel refuses).
- "nvfp4_dequant": NVFP4 unpacked to the compute dtype per call (compiled on CUDA), then GEMM.
- "nvfp4_native": FP4 tensor cores through torch._scaled_mm on sm_100/sm_120. UNTESTED here
  (no Blackwell GPU was available); only used when explicitly allowed (allow_native_fp4=True).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import placement
from .quant_formats import (nvfp4_dequantize, nvfp4_quantize, swizzle_block_scales)

FP8_FORMATS = ("fp8_e4m3fn", "fp8_e4m3fn_scaled", "fp8_e5m2")
# How fp8 e4m3 layers multiply where `_scaled_mm` is available: "fast" (fp8 GEMM, tensor-core
# accumulation; the default), "accurate" (fp8 GEMM, sums promoted to fp32 as cuBLAS does by
# default), "dequantize" (weights up-cast per call, then a GEMM in the compute dtype).
FP8_MATMUL = ("fast", "accurate", "dequantize")
# Per-row scales for every dynamically scaled fp8 input, not only where the writing kernel folds
# them (fp8_rows_input, the GELU quantization): o, cross-attention o and k/v, the audio layers
# and ffn.0 (its norm then writes fp8 rows). One pass per input instead of a reduction and a
# cast, and no scale agreement between ranks under sequence parallelism (a sync point each).
# On one H200 the forward ran as fast as with those inputs per tensor (32,760 tokens: 1.000x
# SDPA, 1.006x 8-bit attention, alternating rounds) with the same cosine against bf16
# (0.99936); docs/BENCHMARKS.md, thirteenth session. False: the per-tensor form (bench switch
# "@dynamic-tensorwise", bench/common.attention_spec).
DYNAMIC_ROWS = True


def check_fp8_matmul(value: str) -> str:
    if value not in FP8_MATMUL:
        raise ValueError(f"fp8_matmul {value!r} is not supported; expected one of {FP8_MATMUL}")
    return value
NVFP4 = "nvfp4"


def _capability(device: torch.device):
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def choose_path(fmt: str, weight_dtype: torch.dtype, out_features: int, in_features: int,
                device, compute_dtype: torch.dtype, allow_scaled_mm: bool = True,
                allow_native_fp4: bool = False) -> str:
    """The one decision of how a layer computes on `device` (never revisited per call)."""
    cap = _capability(torch.device(device))
    shapes_ok = in_features % 16 == 0 and out_features % 16 == 0
    if fmt == NVFP4:
        if allow_native_fp4 and cap is not None and cap[0] in (10, 12) and shapes_ok \
                and hasattr(torch, "float4_e2m1fn_x2"):
            return "nvfp4_native"
        return "nvfp4_dequant"
    if (allow_scaled_mm and cap is not None and cap >= (8, 9) and shapes_ok
            and weight_dtype == torch.float8_e4m3fn
            and compute_dtype in (torch.bfloat16, torch.float16)):
        return "scaled_mm"
    return "dequant"


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, fmt: str, path: str,
                 compute_dtype: torch.dtype = torch.bfloat16, input_scaling: str = "none",
                 quantizer: str = "none", fast_accum: bool = True):
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.fmt = fmt
        self.path = path
        self.compute_dtype = compute_dtype
        self.input_scaling = input_scaling      # "tensor" | "static" | "none"
        self.quantizer = quantizer              # "triton" | "compiled" | "none"
        self.scaled_mm_calls = 0
        self.fast_accum = bool(fast_accum)  # only read on the scaled_mm path
        self.register_parameter("bias", None)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(cls, *, fmt: str, weight: torch.Tensor, weight_scale: torch.Tensor | None,
              bias: torch.Tensor | None, shape: tuple[int, int], device,
              compute_dtype: torch.dtype = torch.bfloat16, weight_scale_2: torch.Tensor | None = None,
              input_scale: torch.Tensor | None = None, allow_scaled_mm: bool = True,
              allow_native_fp4: bool = False, compute_device=None,
              fast_accum: bool = True) -> "QuantLinear":
        """Assemble a layer from already-quantized tensors (from quantize_weight or a file),
        stored on `device`, computing on `compute_device` (default: `device`; BlockSwap stores on
        the CPU and computes on CUDA). For NVFP4 `weight_scale` is the UNSWIZZLED [Np, Kp/16]
        e4m3 block-scale matrix."""
        device = torch.device(device)
        compute_device = device if compute_device is None else torch.device(compute_device)
        n, k = int(shape[0]), int(shape[1])
        path = choose_path(fmt, weight.dtype, n, k, compute_device, compute_dtype,
                           allow_scaled_mm=allow_scaled_mm, allow_native_fp4=allow_native_fp4)
        scaling, quantizer = "none", "none"
        if path == "scaled_mm":
            from . import quant_kernels
            # Dynamic inputs are scaled per tensor, except where the kernel writing the input
            # can scale each row in the same pass (fp8_rows_input, the GELU quantization of
            # ffn.2's input): an H100 ran row-wise _scaled_mm 1.3-1.7x slower with fp32
            # accumulation (bench/fp8_gemm.py); on an H200 with fast accumulation it ran from 6%
            # faster (ffn.2) to 5% slower (5,120 x 5,120) and the forward gained overall
            # (docs/BENCHMARKS.md, tenth session).
            scaling = "static" if input_scale is not None else "tensor"
            quantizer = "triton" if quant_kernels.triton_available() else "compiled"
        layer = cls(k, n, fmt, path, compute_dtype, scaling, quantizer, fast_accum)
        reg = layer.register_buffer
        reg("weight", placement.fresh_copy(weight, device=device))
        if weight_scale is None and fmt != NVFP4 and weight.dtype != compute_dtype:
            weight_scale = torch.ones((), dtype=torch.float32)
        if weight_scale is not None:
            ws = weight_scale if fmt == NVFP4 else weight_scale.reshape(()).float()
            reg("weight_scale", placement.fresh_copy(ws, device=device))
        else:
            reg("weight_scale", None)
        reg("weight_scale_2", None if weight_scale_2 is None else
            placement.fresh_copy(weight_scale_2.reshape(()).float(), device=device))
        reg("input_scale", None if input_scale is None else
            placement.fresh_copy(input_scale.reshape(()).float(), device=device))
        if path == "nvfp4_native":
            reg("weight_scale_swizzled",
                placement.fresh_copy(swizzle_block_scales(weight_scale), device=device),
                persistent=False)
        if bias is not None:
            layer.bias = nn.Parameter(placement.fresh_copy(bias, device=device, dtype=compute_dtype),
                                      requires_grad=False)
        return layer

    def extra_repr(self) -> str:
        extra = f", fast_accum={self.fast_accum}" if self.path == "scaled_mm" else ""
        return (f"in={self.in_features}, out={self.out_features}, fmt={self.fmt}, path={self.path}, "
                f"input_scaling={self.input_scaling}{extra}")

    # ------------------------------------------------------------------ compute
    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = self.compute_dtype if dtype is None else dtype
        if self.fmt == NVFP4:
            fn = nvfp4_dequantize
            if self.weight.is_cuda:
                from .quant_kernels import compiled_nvfp4_dequant
                fn = compiled_nvfp4_dequant()
            return fn(self.weight, self.weight_scale, self.weight_scale_2,
                      (self.out_features, self.in_features), dtype)
        w = self.weight.to(dtype)
        if self.weight_scale is not None:
            w.mul_(self.weight_scale.to(dtype))
        return w

    def dequantize(self) -> torch.Tensor:
        """The full weight in the compute dtype (model code that runs a layer in fp32 uses it)."""
        return self.dequantized_weight()

    def forward(self, x: torch.Tensor, quantized=None) -> torch.Tensor:
        """`quantized`: (xq, scale) from `quantize_input` (or quantize_gelu_ffn_input) of this
        layer's input, shared with other layers reading the same x; only on the scaled_mm path."""
        if self.path == "scaled_mm":
            return self._forward_scaled_mm(x, quantized)
        if self.path == "nvfp4_native":
            return self._forward_nvfp4_native(x)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def quantize_input(self, x: torch.Tensor, scale: torch.Tensor | None = None):
        """(xq [M, K] fp8, fp32 scale) of x [..., K] as this layer's scaled_mm path would make it;
        pass it as forward(x, quantized=...) to every layer that reads this same x and shares
        this layer's input scaling (see shared_input_quantization). `scale`: x's per-tensor
        scale, already folded by the kernel that wrote x (see fp8_scale_slot); x is then only
        cast."""
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        if x2.dtype == torch.float8_e4m3fn:   # written quantized (fused_ops' fp8_rows)
            if scale is None or scale.shape != (x2.shape[0], 1):
                raise ValueError(f"an fp8 input {tuple(x.shape)} needs its row scales "
                                 f"[{x2.shape[0]}, 1], got "
                                 f"{None if scale is None else tuple(scale.shape)}")
            return x2, scale
        return self._quantize_input(x2, scale)

    def _quantize_input(self, x2: torch.Tensor, scale: torch.Tensor | None = None):
        static = self.input_scale if self.input_scaling == "static" else scale
        from . import quant_kernels
        if self.quantizer == "triton":
            if static is None and DYNAMIC_ROWS and x2.shape[1] <= quant_kernels.ROWS_MAX_K:
                return quant_kernels.quantize_rows_triton(x2)
            return quant_kernels.quantize_tensor_triton(x2, static)
        return quant_kernels.compiled_quantizer()(x2, static)

    def _forward_scaled_mm(self, x: torch.Tensor, quantized=None) -> torch.Tensor:
        lead = x.shape[:-1]
        xq, sx = self.quantize_input(x) if quantized is None else quantized
        sw = self.weight_scale
        if sx.dim() == 2:   # row-wise activation scales: scaled_mm wants a [1, N] weight scale
            sw = sw.reshape(1, 1).expand(1, self.out_features).contiguous()
        self.scaled_mm_calls += 1
        out = torch._scaled_mm(
            placement.kernel_ready(xq), placement.kernel_ready(self.weight).t(),
            scale_a=placement.kernel_ready(sx), scale_b=placement.kernel_ready(sw),
            bias=self.bias, out_dtype=self.compute_dtype, use_fast_accum=self.fast_accum)
        return out.reshape(*lead, self.out_features)

    def _gelu_ffn(self, up: "QuantLinear", x: torch.Tensor,
                  x_scale: torch.Tensor | None = None) -> torch.Tensor:
        """self(gelu_tanh(up(x))) with GELU fused into the quantization of self's input."""
        from . import quant_kernels
        h = up(x) if x_scale is None else up(x, quantized=up.quantize_input(x, x_scale))
        h2 = h.reshape(-1, self.in_features)
        if self.input_scaling == "static":
            quantized = quant_kernels.quantize_gelu_tanh_triton(h2, self.input_scale)
        elif self.in_features <= quant_kernels.ROWS_MAX_K:
            # one pass, per-row scales: no second read of h for a per-tensor maximum
            quantized = quant_kernels.quantize_rows_triton(h2, gelu=True)
        else:
            quantized = quant_kernels.quantize_gelu_tanh_triton(h2, None)
        return self(h, quantized=quantized)

    def _forward_nvfp4_native(self, x: torch.Tensor) -> torch.Tensor:
        """UNTESTED (no sm_100/sm_120 GPU here): FP4 x FP4 GEMM with swizzled e4m3 block scales;
        the two fp32 global scales are applied to the output."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        qa, sa, ga = nvfp4_quantize(x2)
        self.scaled_mm_calls += 1
        out = torch._scaled_mm(
            placement.kernel_ready(qa).view(torch.float4_e2m1fn_x2),
            placement.kernel_ready(self.weight).view(torch.float4_e2m1fn_x2).t(),
            scale_a=placement.kernel_ready(swizzle_block_scales(sa)).view(-1),
            scale_b=placement.kernel_ready(self.weight_scale_swizzled).view(-1),
            out_dtype=self.compute_dtype)
        out = out[:x2.shape[0], :self.out_features] * (ga * self.weight_scale_2).to(out.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*lead, self.out_features)


def _scaled_mm_layer(m) -> bool:
    return isinstance(m, QuantLinear) and m.path == "scaled_mm"


def _share_dynamic_scaling(layers, x: torch.Tensor) -> bool:
    first = layers[0]
    return x.is_cuda and all(
        _scaled_mm_layer(m) and m.input_scaling == "tensor" and m.quantizer == first.quantizer
        and m.in_features == first.in_features for m in layers)


def shared_input_quantization(layers, x: torch.Tensor, scale: torch.Tensor | None = None):
    """One quantization of x for several layers that all read x (self-attention's q, k, v), or
    None when they cannot share it: every layer must be a QuantLinear on the scaled_mm path with
    the same in_features, quantizer and per-tensor dynamic input scaling (a file's static input
    scales differ per layer). The result is what each layer would compute itself (same function,
    same input), so outputs are unchanged; pass it as layer(x, quantized=...). `scale`: from
    fp8_scale_slot, folded by the kernel that wrote x."""
    if not _share_dynamic_scaling(layers, x):
        return None
    return layers[0].quantize_input(x, scale)


def fp8_scale_slot(layers, x: torch.Tensor) -> torch.Tensor | None:
    """A scale accumulator for the input of `layers` when the kernel about to write that input can
    fold max|input| / 448 into it (fused_ops' LayerNorms, `amax_to`), so the layers only cast it:
    the same conditions as shared_input_quantization plus the Triton quantizer. None otherwise
    (the layers then compute the scale themselves). `x` is any tensor on the compute device."""
    if not _share_dynamic_scaling(layers, x) or layers[0].quantizer != "triton":
        return None
    from .quant_kernels import scale_accumulator
    return scale_accumulator(x.device)


def fp8_rows_input(layers, x: torch.Tensor) -> bool:
    """True when the kernel about to write the input of `layers` should write it as fp8 with
    per-row scales (fused_ops' `fp8_rows`) for them to read as is: the conditions of
    fp8_scale_slot. The norm then writes 1 byte per value instead of 2 that the layer would
    read again to cast them; row-wise _scaled_mm costs up to ~5% more for these 5,120-wide
    projections on an H200, and the forward gains a little overall (docs/BENCHMARKS.md, tenth
    session). Per-row scales are also finer than one per tensor."""
    return _share_dynamic_scaling(layers, x) and layers[0].quantizer == "triton"


def ffn_rows_input(ffn, x: torch.Tensor) -> bool:
    """Whether ffn.0's input should be written as fp8 rows by its norm (DYNAMIC_ROWS)."""
    return DYNAMIC_ROWS and fp8_rows_input((ffn[0],), x)


def gelu_ffn_fusable(ffn) -> bool:
    """ffn is (Linear, GELU(tanh), Linear) with both linears QuantLinear on scaled_mm and the
    Triton quantizer for the second (GELU is computed inside its input quantization)."""
    return (len(ffn) == 3 and _scaled_mm_layer(ffn[0]) and _scaled_mm_layer(ffn[2])
            and ffn[2].quantizer == "triton" and isinstance(ffn[1], nn.GELU)
            and ffn[1].approximate == "tanh")


def ffn_forward(ffn, x: torch.Tensor, x_scale: torch.Tensor | None = None) -> torch.Tensor:
    """ffn(x); when gelu_ffn_fusable(ffn) and x is on CUDA, the bf16 GELU output is never
    materialized: ffn[2] quantizes gelu_tanh(ffn[0](x)) in two reads of ffn[0]'s output.
    `x_scale`: x's fp8 scale from fp8_scale_slot((ffn[0],), ...), already folded."""
    if x.is_cuda and gelu_ffn_fusable(ffn):
        return ffn[2]._gelu_ffn(ffn[0], x, x_scale)
    if x_scale is not None:
        return ffn[2](ffn[1](ffn[0](x, quantized=ffn[0].quantize_input(x, x_scale))))
    return ffn(x)
