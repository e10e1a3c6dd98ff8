"""Quantized weights for the Wan transformer, under the name the pack's layout promises.

The code lives in wanvideo/quantize.py (conversion and loading of pre-quantized files, beside the
loader that uses them) and the wanvideo/quant_*.py modules; this module only re-exports it, so
`from fp8_optimization import quantize_model` and friends keep working:

- quantize_model(model, fmt, device, include=("blocks",)) replaces nn.Linear layers by
  QuantLinear (fmt: none, fp8_e4m3fn, fp8_e4m3fn_scaled, nvfp4). Merge LoRAs BEFORE this.
- detect_quantization(tensors_or_keys, metadata) tells how a file is quantized, per layer.
- load_quantized_state(model, state_dict, metadata, device) builds the quantized layers of a
  (usually meta-built) model from the file's tensors and returns the keys it consumed.

Pure PyTorch (no ComfyUI import). Nothing inside wanvideo/ imports this module.
"""
from __future__ import annotations

from .wanvideo.quant_files import (QuantFormatError, detect_quantization, quantized_file_tensors,
                                   read_safetensors_views, strip_prefix, write_quantized_file)
from .wanvideo.quant_formats import fp8_quantize, nvfp4_quantize, unswizzle_block_scales
from .wanvideo.quant_linear import FP8_MATMUL, QuantLinear, check_fp8_matmul
from .wanvideo.quantize import (FORMATS, load_quantized_state, quant_report, quantize_model,
                                quantize_weight)

__all__ = ["quantize_model", "load_quantized_state", "detect_quantization", "QuantLinear",
           "QuantFormatError", "write_quantized_file",
           "quantized_file_tensors", "read_safetensors_views", "quant_report", "FORMATS",
           "FP8_MATMUL", "quantize_weight", "check_fp8_matmul", "strip_prefix", "fp8_quantize",
           "nvfp4_quantize", "unswizzle_block_scales"]
