"""LoRAs merged while the model loads, for quantizing on load (wanvideo/quantize_on_load.py).

merge_loras needs the whole model in full precision in memory. Here each LoRA is opened, read
through once for the strict checks (header, NaN/Inf) without keeping anything, matched to the
model's layers and checked against them (lora.match_lora) before any weight of the model is
read: the model may still have its big weights on meta. Its factors are read again from the file
one layer at a time, when the loader holds that layer's full-precision weight, so neither the
model nor the LoRAs ever sit in memory whole. The math is lora.py's own (merged_weight,
merge_bias, merge_module), applied per layer in the LoRAs' order, so the result is bit for bit what
merge_loras gives on a fully loaded model; every failure is a LoraError naming the LoRA.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import torch
from torch import nn

from . import placement
from .checkpoint import Checkpoint, LazyTensors, read_header
from .lora import (LoraResult, checked_strength, lora_label, match_lora, merge_bias,
                   merge_module, merged_weight, named_failures)

log = logging.getLogger(__name__)


@dataclass
class _Merge:
    """One LoRA's parts for one layer: where to read them when that layer is merged."""
    label: str
    strength: float
    parts: dict[str, str]                 # part ("up", "down", "alpha", ...) -> key in source
    source: Mapping[str, torch.Tensor]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {part: self.source[key] for part, key in self.parts.items()}


def open_lora(path: str) -> LazyTensors:
    """A LoRA file read on access, after one pass that reads and checks every tensor (NaN/Inf)
    and keeps none: the same checks as lora.read_lora, at the memory of its largest tensor."""
    tensors, metadata = read_header(path)
    source = Checkpoint([path], "stored", tensors, metadata).lazy()
    for key in source:
        source[key]  # read and checked, then dropped
    return source


def _header_parts(source: Mapping[str, torch.Tensor], parts: Mapping[str, str]) -> dict:
    """What check_parts needs, without reading the factors: meta tensors shaped as the header
    says; a scalar alpha is read (its value is checked)."""
    if not isinstance(source, LazyTensors):
        return {part: source[key] for part, key in parts.items()}
    out = {}
    for part, key in parts.items():
        info = source.ckpt.tensors[key]
        if part == "alpha" and math.prod(info.shape) == 1:
            out[part] = source[key]
        else:
            out[part] = torch.empty(info.shape, dtype=info.dtype, device="meta")
    return out


class LoraPlan:
    """Which LoRA parts go into which layer, in order; `results` is what merge_loras returns."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.results: list[LoraResult] = []
        self.layers: dict[str, list[_Merge]] = {}

    def add(self, model: nn.Module, src, strength, label: str) -> None:
        strength = checked_strength(strength, label)
        source = open_lora(src) if isinstance(src, str) else src
        groups, res = match_lora(model, source, strength, label, for_check=_header_parts)
        if strength != 0:
            for module, parts in groups.items():
                self.layers.setdefault(module, []).append(_Merge(label, strength, parts, source))
                res.merged.append(module)
        log.info("LoRA %s (strength %g): %d layers to merge while loading", label, strength,
                 len(res.merged))
        self.results.append(res)

    @torch.no_grad()
    def merge_loaded(self, model: nn.Module, skip: Iterable[str]) -> None:
        """Merge into the layers that are already loaded (all but `skip`), in place."""
        skip = set(skip)
        for name, merges in self.layers.items():
            if name in skip:
                continue
            for m in merges:
                with named_failures(m.label):
                    merge_module(model, name, m.tensors(), m.strength, self.device)
        placement.verify(model, "merging LoRAs while loading")

    @torch.no_grad()
    def merge_into(self, model: nn.Module, name: str, w: torch.Tensor) -> torch.Tensor:
        """Layer `name`'s weight `w` (not in the model yet) with every LoRA's delta merged, one
        LoRA after the other as merge_loras would; bias deltas go into the model's bias."""
        for m in self.layers.get(name, ()):
            with named_failures(m.label):
                parts = m.tensors()
                new = merged_weight(w, parts, m.strength, name, self.device)
                merge_bias(model, name, parts, m.strength, self.device)
            w = w if new is None else new
            del parts, new
        return w


def plan_loras(model: nn.Module, loras: Sequence[tuple[str | Mapping[str, torch.Tensor], float]],
               device="cpu", names: Sequence[str] | None = None) -> LoraPlan:
    """merge_loras' checks and results without merging anything yet (see the module docstring)."""
    plan = LoraPlan(device)
    for i, (src, strength) in enumerate(loras):
        label = lora_label(src, i, names)
        with named_failures(label):
            plan.add(model, src, strength, label)
    return plan
