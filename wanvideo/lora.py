"""Merge LoRA files into the model's full-precision weights at load time (before quantizing).

Accepted keys, per target layer `<m>` (original Wan names, diffusers names, or underscored):
  `<m>.lora_down.weight` / `<m>.lora_up.weight` (+ `<m>.alpha`), `<m>.lora_A.weight` /
  `<m>.lora_B.weight` (+ alpha), `<m>.diff` (full weight delta), `<m>.diff_b` (bias delta);
prefixes `diffusion_model.`, `model.diffusion_model.`, `transformer.` (diffusers names, mapped
through key_layouts.from_diffusers), `lora_unet_` (dots written as underscores).
W <- W + strength * (alpha / rank) * (up @ down), computed in fp32, stored in W's dtype through
placement.set_tensor. A layer that is already quantized is dequantized, merged and re-quantized
in its own format (merging into high precision first is what keeps the LoRA's small deltas).
Unknown keys are returned and logged, never dropped silently; a file that matches no layer at all
raises LoraError ("LoRA for another model").
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch
from torch import nn

from . import placement
from .key_layouts import from_diffusers, to_diffusers

log = logging.getLogger(__name__)

PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_")
SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".lora_A.weight": "down",
            ".lora_B.weight": "up", ".alpha": "alpha", ".diff": "diff", ".diff_b": "diff_b"}


class LoraError(ValueError):
    """A LoRA file that cannot be applied to this model (message names the file)."""


@dataclass
class LoraResult:
    name: str
    strength: float
    merged: list[str] = field(default_factory=list)     # module names changed
    unknown: list[str] = field(default_factory=list)    # keys that matched nothing


def _module_lookup(model: nn.Module) -> dict[str, str]:
    """Every spelling a LoRA may use for a module -> its name in the model."""
    table = {}
    for name, mod in model.named_modules():
        if not name or ("weight" not in mod._parameters and "weight" not in mod._buffers):
            continue
        diff = to_diffusers(name + ".weight")[:-len(".weight")]
        for spelling in (name, diff):
            table[spelling] = name
            table[spelling.replace(".", "_")] = name
    return table


def _target(key: str, table: dict[str, str]) -> tuple[str | None, str | None]:
    suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
    if suffix is None:
        return None, None
    stem = key[:-len(suffix)]
    for p in PREFIXES:
        if stem.startswith(p):
            stem = stem[len(p):]
            break
    for cand in (stem, from_diffusers(stem + ".weight")[:-len(".weight")]):
        if cand in table:
            return table[cand], SUFFIXES[suffix]
    return None, SUFFIXES[suffix]


def parse_lora(tensors: Mapping[str, torch.Tensor], model: nn.Module
               ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group a LoRA's tensors per model module; returns (groups, unknown keys)."""
    table = _module_lookup(model)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key in tensors:
        module, part = _target(key, table)
        if module is None:
            unknown.append(key)
            continue
        groups.setdefault(module, {})[part] = tensors[key]
    for module, parts in list(groups.items()):
        if ("up" in parts) != ("down" in parts):
            unknown.extend(f"{module}.{p}" for p in parts)
            del groups[module]
    return groups, unknown


def lora_delta(parts: Mapping[str, torch.Tensor], shape, strength: float, device) -> torch.Tensor | None:
    """The fp32 weight delta of one layer (None when the LoRA has only a bias delta)."""
    delta = None
    if "up" in parts:
        up = parts["up"].to(device=device, dtype=torch.float32)
        down = parts["down"].to(device=device, dtype=torch.float32)
        rank = down.shape[0]
        scale = float(parts["alpha"]) / rank if "alpha" in parts else 1.0
        delta = (up.flatten(1) @ down.flatten(1)).reshape(shape) * (strength * scale)
    if "diff" in parts:
        d = parts["diff"].to(device=device, dtype=torch.float32).reshape(shape) * strength
        delta = d if delta is None else delta + d
    return delta


def _merge_module(model: nn.Module, name: str, parts, strength: float, device) -> None:
    from .quant_linear import QuantLinear

    mod = model.get_submodule(name)
    if isinstance(mod, QuantLinear):
        _merge_quantized(model, name, mod, parts, strength, device)
        return
    w = mod.weight
    delta = lora_delta(parts, w.shape, strength, device)
    if delta is not None:
        new = w.detach().to(device=device, dtype=torch.float32) + delta
        placement.set_tensor(model, f"{name}.weight", new, device=w.device, dtype=w.dtype)
    if "diff_b" in parts:
        b = mod.bias
        if b is None:
            raise LoraError(f"LoRA has a bias delta for {name!r}, which has no bias")
        new = b.detach().to(device=device, dtype=torch.float32) + \
            parts["diff_b"].to(device=device, dtype=torch.float32) * strength
        placement.set_tensor(model, f"{name}.bias", new, device=b.device, dtype=b.dtype)


def _merge_quantized(model, name, mod, parts, strength, device) -> None:
    from .. import fp8_optimization as fo
    from .quant_linear import QuantLinear

    shape = (mod.out_features, mod.in_features)
    w = mod.dequantized_weight(torch.float32).to(device)
    delta = lora_delta(parts, shape, strength, device)
    if delta is not None:
        w = w + delta
    bias = mod.bias
    if "diff_b" in parts and bias is not None:
        bias = bias.detach().float().to(device) + parts["diff_b"].float().to(device) * strength
    new = QuantLinear.build(fmt=mod.fmt, bias=bias, shape=shape, device=mod.weight.device,
                            compute_device=device, compute_dtype=mod.compute_dtype,
                            allow_scaled_mm=mod.path == "scaled_mm", fast_accum=mod.fast_accum,
                            **fo.quantize_weight(w, mod.fmt if mod.fmt != "fp8_e5m2"
                                                 else "fp8_e4m3fn_scaled"))
    owner, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, leaf, new)


def read_lora(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(path)


@torch.no_grad()
def merge_loras(model: nn.Module, loras: Sequence[tuple[str | Mapping[str, torch.Tensor], float]],
                device="cpu", names: Sequence[str] | None = None) -> list[LoraResult]:
    """Merge each (file path or tensor dict, strength) into `model`, in order. `device` is where
    the fp32 merge math runs (the GPU when there is one). Returns one LoraResult per LoRA."""
    results = []
    for i, (src, strength) in enumerate(loras):
        label = os.path.basename(src) if isinstance(src, str) else (names[i] if names else f"lora #{i}")
        tensors = read_lora(src) if isinstance(src, str) else src
        groups, unknown = parse_lora(tensors, model)
        if not groups:
            raise LoraError(f"{label}: LoRA for another model: none of its {len(tensors)} keys "
                            f"match a layer of this model (e.g. {list(tensors)[:3]})")
        res = LoraResult(label, float(strength), unknown=sorted(unknown))
        if strength != 0:
            for module, parts in groups.items():
                _merge_module(model, module, parts, float(strength), device)
                res.merged.append(module)
        if unknown:
            log.warning("LoRA %s: %d key(s) match no layer and were not applied, e.g. %s",
                        label, len(unknown), unknown[:5])
        log.info("LoRA %s (strength %g): merged into %d layers", label, strength, len(res.merged))
        results.append(res)
    placement.verify(model, "merge_loras")
    return results
