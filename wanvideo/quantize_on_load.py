"""Quantizing while loading: the weights that quantization replaces are never all in memory in
full precision.

Loading, then merging LoRAs, then quantizing (quantize_model) holds the whole model in its base
dtype first: 28 GB of host RAM for a 14B bf16 model that ends up 14 GB in fp8 or 7 GB in NVFP4.
Here the loader materializes everything else as usual but leaves the weights of the layers to be
quantized on meta (placement.materialize(..., defer=...)), InfiniteTalk's injector does the same
for its layers through `attach`, and `run` then takes those layers one at a time: read the
tensor from its file, cast it to the base dtype on the compute device, merge that layer's LoRA
deltas (lora_plan.LoraPlan.merge_into), quantize it into its QuantLinear (quantize.quantized_layer)
and drop the full-precision copy before the next tensor is read. The set of layers, their order,
the casts, the LoRA math and the layer construction are the ones quantize_model and merge_loras
use, so the model is bit for bit what the load-merge-quantize order gives.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from . import placement
from .checkpoint import CheckpointError
from .quantize import (FORMATS, matmul_options, quant_report, quantize_targets, quantized_layer,
                       replace_module)

log = logging.getLogger(__name__)
_MIB = 1 << 20


@dataclass
class _Pending:
    """Where a deferred weight is read from, and how the plain materialize would have cast it."""
    source: Mapping[str, torch.Tensor]
    key: str  # relative to the module that was materialized from `source`
    dtype_for: Callable | None
    where: str


def _join(*names: str) -> str:
    return ".".join(n for n in names if n)


class QuantizeWhileLoading:
    """The layers quantize_model would replace (nn.Linear under `include`), quantized while the
    model loads. `device` stores the quantized tensors, `compute_device` runs the math and picks
    each layer's compute path, as quantize_model's storage_device / device."""

    def __init__(self, model: nn.Module, fmt: str, device, compute_device,
                 compute_dtype: torch.dtype, fp8_matmul: str = "fast",
                 include: Iterable[str] = ("blocks",)):
        if fmt not in FORMATS or fmt == "none":
            raise ValueError(f"unknown quantization format {fmt!r} (choose from {FORMATS[1:]})")
        self.model, self.fmt, self.include = model, fmt, tuple(include)
        self.storage, self.device = torch.device(device), torch.device(compute_device)
        self.compute_dtype = compute_dtype
        self.allow_scaled_mm, self.fast_accum = matmul_options(fp8_matmul, True)
        self.pending: dict[str, _Pending] = {}

    def defer(self, module: nn.Module, source: Mapping[str, torch.Tensor], dtype_for, where: str,
              prefix: str = "") -> set[str]:
        """The weights of `module` (at `prefix` in the model) that will be quantized, remembered
        with where to read them; pass the result as materialize's `defer`."""
        names = set()
        for name, _ in quantize_targets(module, self.include, prefix=prefix):
            key = _join(name, "weight")
            self.pending[_join(prefix, name)] = _Pending(source, key, dtype_for, where)
            names.add(key)
        return names

    def attach(self, parent: nn.Module, name: str, child: nn.Module, state_dict, device,
               dtype_for=None, where: str = "state dict") -> nn.Module:
        """placement.attach_module for layer injectors (LayerInjector's `attach`): the child's
        weights that will be quantized stay on meta until `run`."""
        defer = ()
        if state_dict is not None:
            defer = self.defer(child, state_dict, dtype_for, where, _join(self._name_of(parent), name))
        return placement.attach_module(parent, name, child, state_dict, device, dtype_for=dtype_for,
                                       where=where, defer=defer)

    def _name_of(self, module: nn.Module) -> str:
        for name, m in self.model.named_modules():
            if m is module:
                return name
        raise ValueError(f"{type(module).__name__} is not part of the model being loaded")

    def targets(self) -> list[str]:
        return [name for name, _ in quantize_targets(self.model, self.include)]

    @torch.no_grad()
    def run(self, loras=None) -> dict:
        """Read, merge (`loras`: a lora_plan.LoraPlan or None), quantize and replace every target
        layer, one at a time. Returns quant_report(model), as quantize_model does."""
        largest, count = 0, 0
        for name in self.targets():
            lin = self.model.get_submodule(name)
            w = self._full_precision(name, lin)
            largest = max(largest, w.numel() * 4)
            if loras is not None:
                w = loras.merge_into(self.model, name, w)
            layer = quantized_layer(lin, w, self.fmt, self.device, self.storage, self.compute_dtype,
                                    allow_scaled_mm=self.allow_scaled_mm, allow_native_fp4=False,
                                    fast_accum=self.fast_accum)
            replace_module(self.model, name, layer)
            del lin, w, layer
            count += 1
        if self.pending:
            raise RuntimeError(f"weights deferred for quantization but never quantized: "
                               f"{sorted(self.pending)[:5]}")
        placement.verify(self.model, f"quantizing while loading ({self.fmt})")
        report = quant_report(self.model)
        log.info("quantized while loading: %d layers to %s, one at a time (largest fp32 working "
                 "copy %.1f MiB); quantized weights %.1f MiB: %s", count, self.fmt,
                 largest / _MIB, report["quantized_bytes"] / _MIB, report["paths"])
        return report

    def _full_precision(self, name: str, lin: nn.Module) -> torch.Tensor:
        """The layer's weight in the base dtype on the compute device: read from its file now, or
        copied from the layer when something loaded it already (an injector without `attach`)."""
        pending = self.pending.pop(name, None)
        if pending is None:
            if lin.weight.device.type == "meta":
                raise RuntimeError(f"layer {name!r} has no weights to quantize (still on meta)")
            return placement.fresh_copy(lin.weight, device=self.device)
        src = pending.source[pending.key]
        if tuple(src.shape) != tuple(lin.weight.shape):
            raise CheckpointError(f"{pending.where}: key {pending.key!r} has shape "
                                  f"{tuple(src.shape)}, expected {tuple(lin.weight.shape)}")
        dtype = pending.dtype_for(pending.key, src) if pending.dtype_for is not None else None
        return placement.fresh_copy(src, device=self.device, dtype=dtype)
