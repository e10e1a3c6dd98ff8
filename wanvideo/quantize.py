"""Quantized weights for the Wan transformer: convert a full-precision model, or load a
pre-quantized ComfyUI file as it is.

- quantize_model(model, fmt, device, include=("blocks",)) replaces nn.Linear layers by
  QuantLinear (fmt: none, fp8_e4m3fn, fp8_e4m3fn_scaled, nvfp4). Merge LoRAs BEFORE this.
  The loader does the same layer by layer while reading the file (quantize_on_load.py) through
  quantize_targets and quantized_layer, so both give the same layers.
- detect_quantization(tensors_or_keys, metadata) tells how a file is quantized, per layer
  (it lives in quant_files.py with the other file conventions).
- load_quantized_state(model, state_dict, metadata, device) builds the quantized layers of a
  (usually meta-built) model from the file's tensors and returns the keys it consumed; the loader
  materializes everything else. See the function's docstring for the exact order.

It sits beside the loader so that loading never reaches above wanvideo/; `fp8_optimization.py` at
the pack root re-exports these names for code that imports them from there. Formats:
quant_formats.py; the layer and its compute paths: quant_linear.py; file conventions and the
tiny-file writer: quant_files.py.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch
from torch import nn

from . import placement
from .quant_files import QuantFormatError, detect_quantization, strip_prefix
from .quant_formats import fp8_quantize, nvfp4_quantize, unswizzle_block_scales
from .quant_linear import QuantLinear, check_fp8_matmul

log = logging.getLogger(__name__)

FORMATS = ("none", "fp8_e4m3fn", "fp8_e4m3fn_scaled", "nvfp4")


def matmul_options(fp8_matmul: str, allow_scaled_mm: bool) -> tuple[bool, bool]:
    """(allow_scaled_mm, fast_accum) for QuantLinear.build."""
    check_fp8_matmul(fp8_matmul)
    return allow_scaled_mm and fp8_matmul != "dequantize", fp8_matmul == "fast"


def _matches(name: str, include: Iterable[str]) -> bool:
    return any(p == "all" or name == p or name.startswith(p + ".") for p in include)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the submodule `name` (dotted) was."""
    owner, leaf = placement.owner_of(model, name)
    setattr(owner, leaf, new)


def quantize_weight(w: torch.Tensor, fmt: str) -> dict:
    """Quantize one full-precision [N, K] weight: tensors for QuantLinear.build."""
    if fmt == "fp8_e4m3fn":
        q, s = fp8_quantize(w, torch.float8_e4m3fn, scaled=False)
        return {"weight": q, "weight_scale": s}
    if fmt == "fp8_e4m3fn_scaled":
        q, s = fp8_quantize(w, torch.float8_e4m3fn, scaled=True)
        return {"weight": q, "weight_scale": s}
    if fmt == "nvfp4":
        packed, bscale, glob = nvfp4_quantize(w)
        return {"weight": packed, "weight_scale": bscale, "weight_scale_2": glob}
    raise ValueError(f"unknown quantization format {fmt!r} (choose from {FORMATS})")


def quantize_targets(model: nn.Module, include: Iterable[str] = ("blocks",),
                     exclude: Iterable[str] = (), prefix: str = "") -> list[tuple[str, nn.Linear]]:
    """(name, layer) of every nn.Linear quantize_model replaces, in module order. Quantizing while
    loading asks the same question of a model whose weights are still on meta, and of a layer
    group about to be attached at `prefix` (names stay relative to `model`; the rule reads the
    full name)."""
    include, exclude = tuple(include), tuple(exclude)
    found = []
    for n, m in model.named_modules():
        full = ".".join(p for p in (prefix, n) if p)
        if type(m) is nn.Linear and _matches(full, include) and not _matches(full, exclude):
            found.append((n, m))
    return found


def quantized_layer(lin: nn.Module, w: torch.Tensor, fmt: str, device, storage,
                    compute_dtype: torch.dtype, allow_scaled_mm: bool, allow_native_fp4: bool,
                    fast_accum: bool) -> QuantLinear:
    """The QuantLinear that replaces `lin` given its full-precision weight `w` (on the compute
    device `device`); `lin` only lends its bias and shape, so its weight may be on meta."""
    parts = quantize_weight(w, fmt)
    return QuantLinear.build(fmt=fmt, bias=lin.bias, shape=tuple(lin.weight.shape),
                             device=storage, compute_device=device, compute_dtype=compute_dtype,
                             allow_scaled_mm=allow_scaled_mm, allow_native_fp4=allow_native_fp4,
                             fast_accum=fast_accum, **parts)


@torch.no_grad()
def quantize_model(model: nn.Module, fmt: str, device, include: Iterable[str] = ("blocks",),
                   exclude: Iterable[str] = (), storage_device=None,
                   compute_dtype: torch.dtype = torch.bfloat16, allow_scaled_mm: bool = True,
                   allow_native_fp4: bool = False, fp8_matmul: str = "fast") -> dict:
    """Replace every nn.Linear whose name is under `include` ("blocks", "text_embedding",
    "head", ..., or "all"; InfiniteTalk's audio layers live under blocks and are included) by a
    QuantLinear. `device` is the compute device (it decides the compute path); quantized
    tensors are stored on `storage_device` (default: `device`; BlockSwap passes "cpu").
    The math runs on the compute device one layer at a time. `fp8_matmul`: see FP8_MATMUL.
    Returns quant_report(model)."""
    allow_scaled_mm, fast_accum = matmul_options(fp8_matmul, allow_scaled_mm)
    if fmt == "none":
        return quant_report(model)
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r} (choose from {FORMATS})")
    device = torch.device(device)
    storage = device if storage_device is None else torch.device(storage_device)
    # Names only: holding the nn.Linear modules until the end would keep every full-precision
    # weight alive next to its quantized copy.
    targets = [name for name, _ in quantize_targets(model, include, exclude)]
    for name in targets:
        lin = model.get_submodule(name)
        w = placement.fresh_copy(lin.weight, device=device) if device.type != "meta" else lin.weight
        layer = quantized_layer(lin, w, fmt, device, storage, compute_dtype,
                                allow_scaled_mm=allow_scaled_mm, allow_native_fp4=allow_native_fp4,
                                fast_accum=fast_accum)
        replace_module(model, name, layer)
        del lin, w, layer
    placement.verify(model, f"quantize_model({fmt})")
    report = quant_report(model)
    log.info("quantized %d linear layers to %s: %s", len(targets), fmt, report["paths"])
    return report


def quant_report(model: nn.Module) -> dict:
    """Counts per format and compute path, quantized weight bytes, and (when some layer runs
    `_scaled_mm`) its accumulation: "fast", "accurate" or "mixed"."""
    fmts: dict[str, int] = {}
    paths: dict[str, int] = {}
    accum: set[bool] = set()
    nbytes = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            fmts[m.fmt] = fmts.get(m.fmt, 0) + 1
            paths[m.path] = paths.get(m.path, 0) + 1
            nbytes += sum(t.numel() * t.element_size() for t in m.buffers())
            if m.path == "scaled_mm":
                accum.add(m.fast_accum)
    report = {"formats": fmts, "paths": paths, "quantized_bytes": nbytes}
    if accum:
        report["fp8_matmul"] = "mixed" if len(accum) > 1 else ("fast" if accum.pop() else "accurate")
    return report


def _file_tensors(sd: Mapping[str, torch.Tensor], by_norm: dict, layer: str) -> dict:
    """The layer's quantized tensors under either naming convention (None when absent)."""
    def get(*leaves):
        for leaf in leaves:
            orig = by_norm.get(f"{layer}.{leaf}")
            if orig is not None:
                return sd[orig]
        return None

    return {"weight": get("weight"), "weight_scale": get("weight_scale", "scale_weight"),
            "input_scale": get("input_scale", "scale_input"), "weight_scale_2": get("weight_scale_2")}


def _file_layer(lin: nn.Module, layer: str, fmt: str, parts: dict) -> dict:
    """`parts` checked against the model's layer, with nvfp4 block scales unswizzled."""
    shape = (lin.out_features, lin.in_features)
    weight = parts["weight"]
    if fmt == "nvfp4":
        if parts["weight_scale"] is None or parts["weight_scale_2"] is None:
            raise QuantFormatError(f"layer {layer!r}: nvfp4 needs weight_scale and weight_scale_2")
        npad, kpad = weight.shape[0], weight.shape[1] * 2
        parts = dict(parts, weight_scale=unswizzle_block_scales(
            placement.fresh_copy(parts["weight_scale"]), npad, kpad // 16))
    elif tuple(weight.shape) != shape:
        raise QuantFormatError(f"layer {layer!r}: weight shape {tuple(weight.shape)}, model "
                               f"expects {shape}")
    return parts


@torch.no_grad()
def load_quantized_state(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                         metadata: Mapping[str, str] | None, device, storage_device=None,
                         compute_dtype: torch.dtype = torch.bfloat16, detected: dict | None = None,
                         allow_scaled_mm: bool = True, allow_native_fp4: bool = False,
                         materialize_rest: bool = False, dtype_for=None,
                         fp8_matmul: str = "fast") -> dict:
    """Build the quantized layers of `model` from a pre-quantized file, as they are.

    `model` may be meta-built (the loader's case). For every quantized layer found by
    detect_quantization, its nn.Linear is replaced by a QuantLinear holding fresh aligned copies
    of the file's tensors (a view of a memory-mapped file is never kept). Quantized buffers are
    registered NON-persistent, so a later placement.materialize(model, rest, ...) does not ask
    for them (it re-homes them on its device as they are, no cast). The bias stays a normal
    parameter and is filled from the file by that materialize.

    Order for the loader: detected = detect_quantization(sd, metadata); build the meta model;
    res = load_quantized_state(model, sd, metadata, device, storage_device=...);
    rest = {k: v for k, v in sd.items() if k not in res["consumed_keys"]};
    placement.materialize(model, rest, device, dtype_for=...). Or pass materialize_rest=True.
    `fp8_matmul`: see FP8_MATMUL.
    Returns {"consumed_keys": set, "layers": n, "detected": ..., "report": quant_report}."""
    allow_scaled_mm, fast_accum = matmul_options(fp8_matmul, allow_scaled_mm)
    device = torch.device(device)
    storage = device if storage_device is None else torch.device(storage_device)
    det = detect_quantization(state_dict, metadata) if detected is None else detected
    by_norm = {strip_prefix(k): k for k in state_dict}
    modules = dict(model.named_modules())
    for layer, conf in det["layers"].items():
        lin = modules.get(layer)
        if lin is None or not isinstance(lin, (nn.Linear, QuantLinear)):
            raise QuantFormatError(f"quantized layer {layer!r} ({conf['format']}) is not a Linear "
                                   f"layer of this model")
        if conf["format"] == "unknown":
            raise QuantFormatError(f"layer {layer!r}: format unknown (pass the tensors, not keys)")
        parts = _file_layer(lin, layer, conf["format"], _file_tensors(state_dict, by_norm, layer))
        use_mm = allow_scaled_mm and not conf.get("full_precision_mm", False)
        if not use_mm:
            parts["input_scale"] = None
        q = QuantLinear.build(fmt=conf["format"], bias=None, shape=(lin.out_features, lin.in_features),
                              device=storage, compute_device=device, compute_dtype=compute_dtype,
                              allow_scaled_mm=use_mm, allow_native_fp4=allow_native_fp4,
                              fast_accum=fast_accum, **parts)
        # Non-persistent, so the loader's materialize of the rest of the file does not ask for
        # them; the bias is left on meta for that same materialize to fill from the file.
        q._non_persistent_buffers_set.update(q._buffers)
        q.register_parameter("bias", None if lin.bias is None else nn.Parameter(
            torch.empty(lin.out_features, device="meta", dtype=compute_dtype),
            requires_grad=False))
        replace_module(model, layer, q)
    consumed = set(det["consumed_keys"])
    if materialize_rest:
        _materialize_rest(model, state_dict, consumed, storage, compute_dtype, dtype_for)
    placement.verify(model, "load_quantized_state")
    return {"consumed_keys": consumed, "layers": len(det["layers"]), "detected": det,
            "report": quant_report(model)}


def _materialize_rest(model, state_dict, consumed, storage, compute_dtype, dtype_for) -> None:
    rest = {strip_prefix(k): v for k, v in state_dict.items() if k not in consumed}
    if dtype_for is None:
        def dtype_for(name, t):  # noqa: ARG001
            return compute_dtype if t.is_floating_point() else None
    placement.materialize(model, rest, storage, dtype_for=dtype_for, where="quantized file")
