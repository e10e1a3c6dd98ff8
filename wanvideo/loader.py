"""Build a WanModel from a checkpoint: meta construction, then materialization through placement."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from accelerate import init_empty_weights

from . import placement
from .attention import check_backend
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint
from .config import ConfigError, WanConfig, infer_config
from .model import WanModel

log = logging.getLogger(__name__)

BASE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Small tensors the official code keeps in fp32: they feed the fp32 modulation sums.
FP32_SUFFIXES = ("modulation",)


def parse_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype):
        return value
    if value in BASE_DTYPES:
        return BASE_DTYPES[value]
    raise ValueError(f"base precision {value!r} is not supported; expected one of {list(BASE_DTYPES)}")


def storage_dtype_policy(base_dtype: torch.dtype) -> Callable[[str, torch.Tensor], torch.dtype | None]:
    def dtype_for(name: str, src: torch.Tensor):
        if not src.is_floating_point():
            return None
        return torch.float32 if name.endswith(FP32_SUFFIXES) else base_dtype
    return dtype_for


@dataclass
class LoadedModel:
    model: WanModel
    report: dict = field(default_factory=dict)


def build_meta_model(cfg: WanConfig, attention: str = "sdpa") -> WanModel:
    """Parameters on the meta device (no memory); buffers (RoPE tables) real, so they move later."""
    with init_empty_weights(include_buffers=False):
        return WanModel(cfg, attention)


def base_report(ckpt: Checkpoint, cfg: WanConfig) -> dict:
    return {
        "files": [os.path.basename(f) for f in ckpt.files],
        "layout": ckpt.layout,
        "model_type": cfg.model_type,
        "config": cfg.summary(),
        "stored_dtype": ckpt.stored_dtype(),
        "quantization": None,
        "infinitetalk": None,
    }


def load_model(paths: str | Sequence[str], device="cpu", base_dtype="bf16", attention: str = "sdpa",
               patch: str | Sequence[str] | None = None) -> LoadedModel:
    """Load a Wan2.1 transformer (T2V or I2V) from any supported layout/dtype.

    `device` is where the weights are materialized (GPU or host RAM); `base_dtype` (bf16/fp16/fp32)
    is the compute precision; fp8 files are up-cast to it. `patch` is an optional InfiniteTalk file.
    """
    base_dtype = parse_dtype(base_dtype)
    check_backend(attention)
    ckpt = open_checkpoint(paths)
    try:
        cfg = infer_config(ckpt.shapes, where=ckpt.name)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    model = build_meta_model(cfg, attention)
    expected = set(model.state_dict().keys())
    try:
        placement.materialize(model, ckpt.lazy(expected), torch.device(device),
                              dtype_for=storage_dtype_policy(base_dtype), where=ckpt.name)
    except KeyError as exc:
        raise CheckpointError(str(exc.args[0])) from None
    except ValueError as exc:
        raise CheckpointError(str(exc)) from None
    model.compute_dtype = base_dtype
    model.eval().requires_grad_(False)
    report = base_report(ckpt, cfg)
    report["base_dtype"] = str(base_dtype).replace("torch.", "")
    report["device"] = str(device)
    report["attention"] = attention
    extra = sorted(set(ckpt.tensors) - expected)
    _apply_extensions(model, ckpt, extra, patch, torch.device(device), base_dtype, report)
    report["parameters"] = sum(p.numel() for p in model.parameters())
    report["layout_violations"] = placement.check_layout(model)
    log.info("WanVideo loader: %s", summarize(report))
    return LoadedModel(model, report)


def _apply_extensions(model, ckpt, extra, patch, device, base_dtype, report) -> None:
    """InfiniteTalk layers merged in the file or given as a patch; leftover keys are reported."""
    try:
        from ..multitalk.inject import apply_infinitetalk_from_checkpoints
    except ImportError:  # running as a top-level `wanvideo` package: no InfiniteTalk support
        apply_infinitetalk_from_checkpoints = None
    if apply_infinitetalk_from_checkpoints is not None:
        patch_ckpt = open_checkpoint(patch) if patch else None
        info, extra = apply_infinitetalk_from_checkpoints(model, ckpt, extra, patch_ckpt, device, base_dtype)
        report["infinitetalk"] = info
    elif patch:
        raise CheckpointError("InfiniteTalk patches need the full pack (multitalk) to be importable")
    if extra:
        report["unused_keys"] = {"count": len(extra), "examples": extra[:5]}
        log.warning("WanVideo loader: %s has %d keys the model does not use, e.g. %s",
                    ckpt.name, len(extra), extra[:5])


def summarize(report: dict) -> str:
    cfg = report["config"]
    it = report.get("infinitetalk")
    return (f"{report['model_type'].upper()} {cfg['num_layers']} blocks dim {cfg['dim']} "
            f"({report['parameters'] / 1e9:.2f} B params), layout {report['layout']}, stored "
            f"{report['stored_dtype']}, compute {report.get('base_dtype')}, quantization "
            f"{report.get('quantization') or 'none'}, InfiniteTalk "
            f"{'yes (%s blocks)' % it.get('blocks_patched') if it else 'no'}, "
            f"layout violations {len(report['layout_violations'])}")
