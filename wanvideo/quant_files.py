"""Quantized checkpoint conventions: detection of ComfyUI's formats and a tiny-file writer.

Conventions read (ComfyUI's key names, original Wan layout, optional `model.diffusion_model.` /
`diffusion_model.` prefix):
- plain fp8: a Linear `<layer>.weight` stored as float8_e4m3fn / float8_e5m2, no scale (scale 1).
- legacy "fp8_scaled": a `scaled_fp8` marker tensor (its dtype = the fp8 dtype; 2 elements means
  "full-precision matmul"), per layer `<layer>.scale_weight` (fp32) and optional
  `<layer>.scale_input`. W = W_fp8 * scale_weight.
- comfy_quant: per layer `<layer>.comfy_quant` (uint8 JSON, e.g. {"format": "nvfp4"}) and/or the
  safetensors metadata `_quantization_metadata` ({"format_version": "1.0", "layers": {name:
  {"format": ...} or name: "format"}}); tensors `<layer>.weight_scale`, `<layer>.weight_scale_2`,
  `<layer>.input_scale`. Formats float8_e4m3fn, float8_e5m2, nvfp4 (mxfp8 is refused clearly).

Internal format names: fp8_e4m3fn (scale 1), fp8_e4m3fn_scaled, fp8_e5m2, nvfp4.
"""
from __future__ import annotations

import json
import logging
import struct
from typing import Iterable, Mapping

import torch

from .checkpoint import SAFETENSORS_DTYPES
from .key_layouts import COMFY_PREFIXES
from .safetensors_writer import write_safetensors
from .quant_formats import (FP8_DTYPES, encode_comfy_quant, decode_comfy_quant, fp8_quantize,
                            nvfp4_quantize, swizzle_block_scales)

log = logging.getLogger(__name__)

PREFIXES = COMFY_PREFIXES
LAYER_SUFFIXES = ("weight_scale", "weight_scale_2", "input_scale", "comfy_quant", "scale_weight",
                  "scale_input")
METADATA_KEY = "_quantization_metadata"
MARKER_KEY = "scaled_fp8"
COMFY_FORMATS = {"float8_e4m3fn": "fp8_e4m3fn_scaled", "float8_e5m2": "fp8_e5m2", "nvfp4": "nvfp4"}


class QuantFormatError(ValueError):
    """A quantized file this pack cannot read as it is (message names the layer and format)."""


def strip_prefix(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def _split_layer(key: str) -> tuple[str, str]:
    layer, _, leaf = key.rpartition(".")
    return layer, leaf


def _metadata_layers(metadata: Mapping[str, str] | None) -> dict[str, dict]:
    if not metadata or METADATA_KEY not in metadata:
        return {}
    raw = metadata[METADATA_KEY]
    meta = json.loads(raw) if isinstance(raw, str) else raw
    if not isinstance(meta, dict) or "layers" not in meta:
        raise QuantFormatError(f"{METADATA_KEY} has no 'layers' table")
    out = {}
    for name, conf in meta["layers"].items():
        out[strip_prefix(name)] = conf if isinstance(conf, dict) else {"format": conf}
    return out


def _internal_format(comfy_format: str, layer: str) -> str:
    if comfy_format not in COMFY_FORMATS:
        raise QuantFormatError(f"layer {layer!r}: quantization format {comfy_format!r} is not "
                               f"supported (supported: {sorted(COMFY_FORMATS)})")
    return COMFY_FORMATS[comfy_format]


def detect_quantization(tensors: Mapping[str, torch.Tensor] | Iterable[str],
                        metadata: Mapping[str, str] | None = None,
                        dtypes: Mapping[str, torch.dtype] | None = None) -> dict:
    """Describe how a checkpoint is quantized, per layer, without changing anything.

    `tensors`: a mapping key -> tensor (`.comfy_quant` and `scaled_fp8` contents are read; a lazy
    mapping works) or just the key names (then only the metadata and key suffixes are used).
    `dtypes` (key -> stored dtype, e.g. from the safetensors header) avoids reading weights just
    to learn their dtype; without it weight dtypes come from `tensors[key].dtype`. Returns
    {"kind": "none"|"fp8"|"scaled_fp8"|"comfy_quant", "layers": {layer: {"format", "full_precision_mm"}},
     "counts": {format: n}, "consumed_keys": [original key names owned by quantized layers],
     "full_precision_mm": bool}. Layer names are in the original layout without prefix.
    """
    has_values = isinstance(tensors, Mapping)
    keys = list(tensors.keys()) if has_values else list(tensors)
    by_norm = {strip_prefix(k): k for k in keys}
    layers: dict[str, dict] = {}
    kind = _comfy_quant_layers(tensors if has_values else None, by_norm, metadata, layers)
    full_prec = False
    if MARKER_KEY in by_norm:
        kind = "scaled_fp8" if kind == "none" else kind
        if has_values:
            full_prec = tensors[by_norm[MARKER_KEY]].numel() == 2
        _scaled_fp8_layers(by_norm, full_prec, layers)
    if has_values or dtypes is not None:
        dtype_of = dtypes.__getitem__ if dtypes is not None else (lambda key: tensors[key].dtype)
        if _plain_fp8_layers(by_norm, dtype_of, layers) and kind == "none":
            kind = "fp8"
    counts: dict[str, int] = {}
    for conf in layers.values():
        counts[conf["format"]] = counts.get(conf["format"], 0) + 1
    return {"kind": kind, "layers": layers, "counts": counts,
            "consumed_keys": _consumed_keys(by_norm, layers), "full_precision_mm": full_prec}


def _comfy_layer(conf: Mapping, layer: str) -> dict:
    return {"format": _internal_format(conf.get("format"), layer),
            "full_precision_mm": bool(conf.get("full_precision_matrix_mult", False))}


def _comfy_quant_layers(values: Mapping[str, torch.Tensor] | None, by_norm: Mapping[str, str],
                        metadata: Mapping[str, str] | None, layers: dict[str, dict]) -> str:
    """Adds the layers the comfy_quant convention names (metadata table, then per-layer
    `.comfy_quant` tensors, which win); returns the kind found so far."""
    kind = "none"
    for layer, conf in _metadata_layers(metadata).items():
        layers[layer] = _comfy_layer(conf, layer)
        kind = "comfy_quant"
    for norm, orig in by_norm.items():
        layer, leaf = _split_layer(norm)
        if leaf != "comfy_quant":
            continue
        kind = "comfy_quant"
        if values is not None:
            layers[layer] = _comfy_layer(decode_comfy_quant(values[orig]), layer)
        elif layer not in layers:
            layers[layer] = {"format": "unknown", "full_precision_mm": False}
    return kind


def _scaled_fp8_layers(by_norm: Mapping[str, str], full_prec: bool, layers: dict[str, dict]) -> None:
    for norm in by_norm:
        layer, leaf = _split_layer(norm)
        if leaf == "scale_weight" and layer not in layers:
            layers[layer] = {"format": "fp8_e4m3fn_scaled", "full_precision_mm": full_prec}


def _plain_fp8_layers(by_norm: Mapping[str, str], dtype_of, layers: dict[str, dict]) -> bool:
    """Plain fp8 weights (no marker, no scale), and the dtype truth for legacy scaled files.
    True when a layer was found that nothing else had declared quantized."""
    found = False
    for norm, orig in by_norm.items():
        layer, leaf = _split_layer(norm)
        if leaf != "weight":
            continue
        dt = dtype_of(orig)
        if dt not in (torch.float8_e4m3fn, torch.float8_e5m2):
            if layer in layers and layers[layer]["format"].startswith("fp8"):
                # legacy files carry scale_weight on layers kept in high precision too
                del layers[layer]
            continue
        if layer not in layers:
            layers[layer] = {"format": "fp8_e4m3fn" if dt == torch.float8_e4m3fn
                             else "fp8_e5m2", "full_precision_mm": False}
            found = True
        elif dt == torch.float8_e5m2 and layers[layer]["format"] != "nvfp4":
            layers[layer]["format"] = "fp8_e5m2"
    return found


def _consumed_keys(by_norm: Mapping[str, str], layers: Mapping[str, dict]) -> list[str]:
    consumed = []
    for norm, orig in by_norm.items():
        layer, leaf = _split_layer(norm)
        if norm == MARKER_KEY or (leaf in LAYER_SUFFIXES and layer in layers) or \
                (leaf == "weight" and layer in layers):
            consumed.append(orig)
        elif leaf in LAYER_SUFFIXES and leaf in ("scale_weight", "scale_input"):
            consumed.append(orig)  # dummy scales on high-precision layers of legacy files
    return sorted(consumed)


# --------------------------------------------------------------------------------- writer

def is_linear_weight(key: str, t: torch.Tensor, include: Iterable[str]) -> bool:
    norm = strip_prefix(key)
    return (norm.endswith(".weight") and t.dim() == 2
            and any(norm == p or norm.startswith(p + ".") for p in include))


def quantized_file_tensors(state_dict: Mapping[str, torch.Tensor], fmt: str,
                           include: Iterable[str] = ("blocks",), input_scale: float | None = None,
                           marker: str = "tensor") -> tuple[dict, dict]:
    """(tensors, metadata) of a ComfyUI-style quantized file made from a full-precision state
    dict. fmt: "fp8_e4m3fn" (plain), "fp8_scaled" (legacy marker), "fp8_scaled_fullprec"
    (2-element marker), "comfy_fp8", "comfy_fp8_e5m2", "comfy_nvfp4". marker (comfy_* only):
    "tensor" (`.comfy_quant` tensors), "metadata" (`_quantization_metadata`) or "both"."""
    include = tuple(include)
    out: dict[str, torch.Tensor] = {}
    layers_meta: dict[str, dict] = {}
    for key, t in state_dict.items():
        if not is_linear_weight(key, t, include):
            out[key] = t
            continue
        layer = key[:-len(".weight")]
        if fmt == "fp8_e4m3fn":
            out[key], _ = fp8_quantize(t, torch.float8_e4m3fn, scaled=False)
        elif fmt in ("fp8_scaled", "fp8_scaled_fullprec"):
            out[key], out[layer + ".scale_weight"] = fp8_quantize(t, torch.float8_e4m3fn)
            if input_scale is not None:
                out[layer + ".scale_input"] = torch.tensor(input_scale, dtype=torch.float32)
        elif fmt in ("comfy_fp8", "comfy_fp8_e5m2"):
            cf = "float8_e4m3fn" if fmt == "comfy_fp8" else "float8_e5m2"
            out[key], out[layer + ".weight_scale"] = fp8_quantize(t, FP8_DTYPES[cf])
            if input_scale is not None:
                out[layer + ".input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
            layers_meta[layer] = {"format": cf}
        elif fmt == "comfy_nvfp4":
            packed, bscale, glob = nvfp4_quantize(t)
            out[key] = packed
            out[layer + ".weight_scale"] = swizzle_block_scales(bscale)
            out[layer + ".weight_scale_2"] = glob
            layers_meta[layer] = {"format": "nvfp4"}
        else:
            raise ValueError(f"unknown file format {fmt!r}")
        if layer in layers_meta and marker in ("tensor", "both"):
            out[layer + ".comfy_quant"] = encode_comfy_quant(layers_meta[layer])
    if fmt in ("fp8_scaled", "fp8_scaled_fullprec"):
        n = 2 if fmt == "fp8_scaled_fullprec" else 0
        out[MARKER_KEY] = torch.zeros(n, dtype=torch.float8_e4m3fn)
    metadata = {}
    if layers_meta and marker in ("metadata", "both"):
        metadata[METADATA_KEY] = json.dumps({"format_version": "1.0", "layers": layers_meta})
    return out, metadata


def write_quantized_file(state_dict: Mapping[str, torch.Tensor], fmt: str, path: str,
                         include: Iterable[str] = ("blocks",), input_scale: float | None = None,
                         marker: str = "tensor", header_pad: int = 0,
                         order: list[str] | None = None) -> dict[str, int]:
    """Write a tiny ComfyUI-convention quantized file (see quantized_file_tensors); returns the
    absolute offset of every tensor."""
    tensors, metadata = quantized_file_tensors(state_dict, fmt, include, input_scale, marker)
    if order is not None:
        order = [k for k in order if k in tensors] + [k for k in tensors if k not in order]
        tensors = {k: tensors[k] for k in order}
    return write_safetensors(path, tensors, metadata, data_start_mod16=None, header_pad=header_pad)


def read_safetensors_views(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a file into ONE byte buffer and return views into it at the file's offsets, like a
    memory map would (misaligned wherever the file is). Tests use it to prove the loader copies."""
    with open(path, "rb") as f:
        data = f.read()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    buf = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        dt = SAFETENSORS_DTYPES[info["dtype"]]
        raw = buf[8 + hlen + a: 8 + hlen + b]
        if raw.storage_offset() % torch.empty((), dtype=dt).element_size():
            raw = raw.clone()  # element-misaligned views are impossible in torch; copy those
        out[name] = raw.view(dt).reshape(info["shape"])
    return out, header.get("__metadata__", {})
