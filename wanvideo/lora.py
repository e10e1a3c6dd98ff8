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
raises LoraError ("LoRA for another model"). Files are read through checkpoint.load_tensors (strict
header, NaN/Inf check), every layer's tensors are checked against the layer before anything is
merged, and a merge that overflows is refused: whatever is wrong with one LoRA surfaces as a
LoraError naming its file (and the layer). After a failure the model may hold the layers merged
before it and must be discarded (the loader does). lora_plan.py applies these same steps while the
model loads, one layer at a time.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import placement
from .checkpoint import CheckpointError, all_finite, load_tensors
from .key_layouts import COMFY_PREFIXES, from_diffusers, to_diffusers
from .quant_linear import QuantLinear
from .quantize import quantize_weight, replace_module

log = logging.getLogger(__name__)

PREFIXES = COMFY_PREFIXES + ("transformer.", "lora_unet_")
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


def group_keys(keys: Iterable[str], model: nn.Module) -> tuple[dict[str, dict[str, str]], list[str]]:
    """Group a LoRA's keys per model module ({module: {part: key}}); returns (groups, unknown
    keys). Only names are read, so a model whose weights are still on meta is matched too."""
    table = _module_lookup(model)
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        module, part = _target(key, table)
        if module is None:
            unknown.append(key)
            continue
        groups.setdefault(module, {})[part] = key
    for module, parts in list(groups.items()):
        if ("up" in parts) != ("down" in parts):
            unknown.extend(f"{module}.{p}" for p in parts)
            del groups[module]
    return groups, unknown


def parse_lora(tensors: Mapping[str, torch.Tensor], model: nn.Module
               ) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """Group a LoRA's tensors per model module; returns (groups, unknown keys)."""
    groups, unknown = group_keys(tensors, model)
    return {m: _tensors(tensors, parts) for m, parts in groups.items()}, unknown


def _tensors(source: Mapping[str, torch.Tensor], parts: Mapping[str, str]) -> dict[str, torch.Tensor]:
    return {part: source[key] for part, key in parts.items()}


def check_parts(name: str, parts: Mapping[str, torch.Tensor], shape, bias) -> None:
    """One layer's LoRA tensors against the layer (weight `shape`, `bias` or None), before any
    math: a rank-0 pair, factors that do not multiply to the weight, a non-scalar or non-finite
    alpha, or a delta of the wrong size raise LoraError naming the layer."""
    shape = tuple(shape)
    numel = math.prod(shape)
    if "up" in parts:
        up, down = parts["up"], parts["down"]
        pair = f"up {tuple(up.shape)} and down {tuple(down.shape)}"
        if up.dim() < 2 or down.dim() < 2 or down.shape[0] == 0:
            raise LoraError(f"layer {name!r}: {pair} are not a LoRA pair of rank >= 1")
        if up.shape[0] != shape[0] or math.prod(up.shape[1:]) != down.shape[0] or \
                math.prod(down.shape[1:]) * shape[0] != numel:
            raise LoraError(f"layer {name!r}: {pair} do not multiply to its weight {shape}")
    if "alpha" in parts:
        alpha = torch.as_tensor(parts["alpha"])
        if alpha.numel() != 1:
            raise LoraError(f"layer {name!r}: alpha has shape {tuple(alpha.shape)}, not a scalar")
        if not math.isfinite(float(alpha)):
            raise LoraError(f"layer {name!r}: alpha is {float(alpha)}")
    if "diff" in parts and parts["diff"].numel() != numel:
        raise LoraError(f"layer {name!r}: diff {tuple(parts['diff'].shape)} does not match its "
                        f"weight {shape}")
    if "diff_b" in parts:
        if bias is None:
            raise LoraError(f"LoRA has a bias delta for {name!r}, which has no bias")
        if parts["diff_b"].numel() != bias.numel():
            raise LoraError(f"layer {name!r}: diff_b {tuple(parts['diff_b'].shape)} does not "
                            f"match its bias {tuple(bias.shape)}")


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


def _finite(value: torch.Tensor, name: str, strength: float) -> torch.Tensor:
    """`value` (already in the dtype it is stored in) or LoraError when the merge overflowed."""
    if not all_finite(value):
        raise LoraError(f"merging into {name!r} at strength {strength:g} gives NaN/Inf "
                        f"{str(value.dtype).replace('torch.', '')} weights; lower the strength")
    return value


def layer_shapes(model: nn.Module, name: str) -> tuple[tuple[int, ...], torch.Tensor | None]:
    """(weight shape, bias or None) of layer `name`, whatever it holds (meta weights too)."""
    mod = model.get_submodule(name)
    if isinstance(mod, QuantLinear):
        return (mod.out_features, mod.in_features), mod.bias
    return tuple(mod.weight.shape), getattr(mod, "bias", None)


def merged_weight(w: torch.Tensor, parts, strength: float, name: str, device) -> torch.Tensor | None:
    """`w` plus the layer's delta, summed in fp32 on `device` and rounded back to w's dtype
    (None when the LoRA only has a bias delta); LoraError when the sum overflows."""
    delta = lora_delta(parts, w.shape, strength, device)
    if delta is None:
        return None
    master = placement.fresh_copy(w.detach(), device=device, dtype=torch.float32)
    return _finite((master + delta).to(w.dtype), name, strength)


def merge_bias(model: nn.Module, name: str, parts, strength: float, device) -> None:
    if "diff_b" not in parts:
        return
    b = model.get_submodule(name).bias
    new = (placement.fresh_copy(b.detach(), device=device, dtype=torch.float32) +
           parts["diff_b"].to(device=device, dtype=torch.float32) * strength).to(b.dtype)
    placement.set_tensor(model, f"{name}.bias", _finite(new, name, strength),
                         device=b.device, dtype=b.dtype)


def merge_module(model: nn.Module, name: str, parts, strength: float, device) -> None:
    """One LoRA's `parts` merged into the loaded layer `name` (re-quantized when quantized)."""
    mod = model.get_submodule(name)
    if isinstance(mod, QuantLinear):
        _merge_quantized(model, name, mod, parts, strength, device)
        return
    w = mod.weight
    new = merged_weight(w, parts, strength, name, device)
    if new is not None:
        placement.set_tensor(model, f"{name}.weight", new, device=w.device, dtype=w.dtype)
    merge_bias(model, name, parts, strength, device)


def _merge_quantized(model, name, mod, parts, strength, device) -> None:
    shape = (mod.out_features, mod.in_features)
    w = placement.fresh_copy(mod.dequantized_weight(torch.float32), device=device)
    delta = lora_delta(parts, shape, strength, device)
    if delta is not None:
        w = _finite(w + delta, name, strength)
    bias = mod.bias
    if "diff_b" in parts and bias is not None:
        bias = _finite(placement.fresh_copy(bias.detach(), device=device, dtype=torch.float32)
                       + parts["diff_b"].float().to(device) * strength, name, strength)
    new = QuantLinear.build(fmt=mod.fmt, bias=bias, shape=shape, device=mod.weight.device,
                            compute_device=device, compute_dtype=mod.compute_dtype,
                            allow_scaled_mm=mod.path == "scaled_mm", fast_accum=mod.fast_accum,
                            **quantize_weight(w, mod.fmt if mod.fmt != "fp8_e5m2"
                                              else "fp8_e4m3fn_scaled"))
    replace_module(model, name, new)


def read_lora(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a LoRA file through the strict reader (CheckpointError naming the file)."""
    return load_tensors(path)


# What one broken LoRA can raise while being read, checked or merged; each becomes a LoraError
# naming the file. Out-of-memory is not the file's fault and passes through unchanged.
_LORA_FAILURES = (CheckpointError, ValueError, TypeError, RuntimeError, ArithmeticError,
                  IndexError, KeyError, AttributeError)


@contextlib.contextmanager
def named_failures(label: str):
    """Whatever goes wrong inside becomes a LoraError whose message starts with `label`."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise
    except _LORA_FAILURES as exc:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        message = message if message.startswith(label) else f"{label}: {message}"
        raise LoraError(message) from None


def lora_label(src, index: int, names: Sequence[str] | None = None) -> str:
    return os.path.basename(src) if isinstance(src, str) else (names[index] if names else f"lora #{index}")


@torch.no_grad()
def merge_loras(model: nn.Module, loras: Sequence[tuple[str | Mapping[str, torch.Tensor], float]],
                device="cpu", names: Sequence[str] | None = None) -> list[LoraResult]:
    """Merge each (file path or tensor dict, strength) into `model`, in order. `device` is where
    the fp32 merge math runs (the GPU when there is one). Returns one LoraResult per LoRA; any
    failure of a LoRA raises LoraError naming it."""
    results = []
    for i, (src, strength) in enumerate(loras):
        label = lora_label(src, i, names)
        with named_failures(label):
            results.append(_merge_one(model, src, strength, label, device))
    placement.verify(model, "merge_loras")
    return results


def checked_strength(strength, label: str) -> float:
    strength = float(strength)
    if not math.isfinite(strength):
        raise LoraError(f"{label}: strength {strength} is not a finite number")
    return strength


def match_lora(model: nn.Module, tensors: Mapping[str, torch.Tensor], strength: float, label: str,
               for_check=_tensors) -> tuple[dict[str, dict[str, str]], LoraResult]:
    """`tensors` grouped per layer ({module: {part: key}}) and every layer's parts checked against
    it before anything is merged; `for_check(tensors, parts)` gives what check_parts reads."""
    groups, unknown = group_keys(tensors, model)
    if not groups:
        raise LoraError(f"{label}: LoRA for another model: none of its {len(tensors)} keys "
                        f"match a layer of this model (e.g. {[k[:80] for k in list(tensors)[:3]]})")
    for module, parts in groups.items():  # all layers first, so a bad one merges nothing
        check_parts(module, for_check(tensors, parts), *layer_shapes(model, module))
    if unknown:
        log.warning("LoRA %s: %d key(s) match no layer and were not applied, e.g. %s",
                    label, len(unknown), unknown[:5])
    return groups, LoraResult(label, strength, unknown=sorted(unknown))


def _merge_one(model: nn.Module, src, strength, label: str, device) -> LoraResult:
    strength = checked_strength(strength, label)
    tensors = read_lora(src) if isinstance(src, str) else src
    groups, res = match_lora(model, tensors, strength, label)
    if strength != 0:
        for module, parts in groups.items():
            merge_module(model, module, _tensors(tensors, parts), strength, device)
            res.merged.append(module)
    log.info("LoRA %s (strength %g): merged into %d layers", label, strength, len(res.merged))
    return res
