"""Build a WanModel from a checkpoint: meta construction, then materialization through placement."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from accelerate import init_empty_weights

from . import memory, placement
from .attention import check_backend
from .checkpoint import Checkpoint, CheckpointError, open_checkpoint
from .config import ConfigError, WanConfig, infer_config
from .load_budget import require_room
from .lora import merge_loras
from .lora_plan import plan_loras
from .model import WanModel
from .quant_linear import check_fp8_matmul
from .quantize import FORMATS, detect_quantization, load_quantized_state, quantize_model
from .quantize_on_load import QuantizeWhileLoading

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


# (model, checkpoint, unused keys, patch checkpoint or None, device, base dtype[, attach=])
#   -> (report of the layers added or None, keys still unused).
# InfiniteTalk's layers are known only to multitalk/, which sits above wanvideo/, so callers hand
# the injector in (multitalk.inject.apply_infinitetalk_from_checkpoints) instead of the loader
# importing upwards. When quantizing on load the loader also passes `attach`, a stand-in for
# placement.attach_module (same arguments) that the injector must fill its layers through: it
# leaves the weights that will be quantized on meta, to be read and quantized one at a time.
LayerInjector = Callable[..., tuple[dict | None, list]]


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


QUANTIZE_CHOICES = FORMATS


def load_model(paths: str | Sequence[str], device="cpu", base_dtype="bf16", attention: str = "sdpa",
               patch: str | Sequence[str] | None = None, quantization: str = "none",
               loras: Sequence[tuple[str, float]] = (), compute_device=None,
               fp8_matmul: str = "fast", inject: LayerInjector | None = None,
               _streamed: bool = True) -> LoadedModel:
    """Load a Wan2.1 transformer (T2V or I2V) from any supported layout/dtype.

    `device` is where the weights are materialized (GPU or host RAM); `compute_device` is where
    they will run (it picks the quantized compute path; defaults to `device`). `base_dtype`
    (bf16/fp16/fp32) is the compute precision. Pre-quantized files (fp8, ComfyUI fp8_scaled /
    comfy_quant, NVFP4) load as they are; full-precision files may be quantized on load with
    `quantization`. `patch` is an optional InfiniteTalk file; `loras` are (file, strength) pairs
    merged into the full-precision weights before any quantization. `fp8_matmul` is how fp8 layers
    multiply on GPUs with fp8 tensor cores: "fast" (default), "accurate" or "dequantize"
    (quant_linear.FP8_MATMUL). `inject` adds the InfiniteTalk layers of `patch` or of keys merged
    into the checkpoint (pass multitalk.inject.apply_infinitetalk_from_checkpoints); without it a
    `patch` is refused and merged InfiniteTalk keys are reported as unused.

    With `quantization` each layer is read, merged with the LoRAs and quantized in turn
    (quantize_on_load.py): the model never sits in memory in full precision, bit for bit the
    older order (load all, merge, quantize) that `_streamed=False` keeps for the tests.
    """
    base_dtype = parse_dtype(base_dtype)
    if quantization not in QUANTIZE_CHOICES:
        raise ValueError(f"quantization {quantization!r} is not supported; expected one of {QUANTIZE_CHOICES}")
    check_fp8_matmul(fp8_matmul)  # before reading the checkpoint
    check_backend(attention)
    if patch and inject is None:
        raise CheckpointError("an InfiniteTalk patch needs its injector: pass "
                              "inject=multitalk.inject.apply_infinitetalk_from_checkpoints")
    device = torch.device(device)
    compute_device = device if compute_device is None else torch.device(compute_device)
    ckpt = open_checkpoint(paths)
    try:
        cfg = infer_config(ckpt.shapes, where=ckpt.name)
    except ConfigError as exc:
        raise CheckpointError(str(exc)) from None
    require_room(ckpt, device, base_dtype, quantization)   # before the first weight is read
    memory.return_freed_host_memory()
    model = build_meta_model(cfg, attention)
    report = base_report(ckpt, cfg)
    settings = _Settings(device, compute_device, base_dtype, fp8_matmul,
                         quantization if _streamed and quantization != "none" else None)
    expected, consumed, streamer = _materialize_base(model, ckpt, report, settings)
    model.compute_dtype = base_dtype
    model.eval().requires_grad_(False)
    report.update(base_dtype=str(base_dtype).replace("torch.", ""), device=str(device), attention=attention)
    extra = sorted(set(ckpt.tensors) - expected - consumed)
    _apply_extensions(model, ckpt, extra, patch, device, base_dtype, report, inject, streamer)
    if streamer is not None:
        _merge_and_quantize_while_loading(model, streamer, loras, compute_device, report)
    else:
        if loras:
            report["loras"] = _merge_loras(model, loras, compute_device)
        if quantization != "none":
            _quantize_on_load(model, ckpt, quantization, device, compute_device, base_dtype, report,
                              fp8_matmul)
    return _finish(model, report)


def _finish(model: WanModel, report: dict) -> LoadedModel:
    report["parameters"] = sum(p.numel() for p in model.parameters()) + _quantized_elements(model)
    report["layout_violations"] = placement.check_layout(model)
    memory.trim_host_memory()
    log.info("WanVideo loader: %s", summarize(report))
    return LoadedModel(model, report)


@dataclass(frozen=True)
class _Settings:
    device: torch.device
    compute_device: torch.device
    base_dtype: torch.dtype
    fp8_matmul: str
    stream_quantization: str | None  # the format quantized while loading, or None


def _checkpoint_error(ckpt: Checkpoint, exc: Exception) -> CheckpointError:
    if isinstance(exc, KeyError):
        return CheckpointError(str(exc.args[0]))
    return CheckpointError(f"{ckpt.name}: {exc}" if ckpt.name not in str(exc) else str(exc))


def _materialize_base(model, ckpt, report, s: _Settings):
    """Pre-quantized layers from the file, then every other tensor; with stream_quantization the
    weights of the layers to quantize stay on meta for the streamer (returned, else None)."""
    try:
        consumed = _load_prequantized(model, ckpt, s.device, s.compute_device, s.base_dtype, report,
                                      s.fp8_matmul)
    except (KeyError, ValueError) as exc:
        raise _checkpoint_error(ckpt, exc) from None
    streamer = None
    if s.stream_quantization:
        _refuse_requantizing(ckpt, report)
        streamer = QuantizeWhileLoading(model, s.stream_quantization, s.device, s.compute_device,
                                        s.base_dtype, s.fp8_matmul)
    expected = set(model.state_dict().keys())
    source, dtype_for = ckpt.lazy(expected), storage_dtype_policy(s.base_dtype)
    defer = streamer.defer(model, source, dtype_for, ckpt.name) if streamer is not None else ()
    try:
        placement.materialize(model, source, s.device, dtype_for=dtype_for, where=ckpt.name,
                              defer=defer)
    except (KeyError, ValueError) as exc:
        raise _checkpoint_error(ckpt, exc) from None
    return expected, consumed, streamer


def _merge_and_quantize_while_loading(model, streamer: QuantizeWhileLoading, loras, compute_device,
                                      report) -> None:
    """LoRAs checked against the model first; layers already loaded take their deltas in place,
    the layers to quantize take theirs as the streamer reads them."""
    plan = None
    if loras:
        plan = plan_loras(model, list(loras), device=compute_device)
        plan.merge_loaded(model, skip=streamer.targets())
        report["loras"] = [vars(r) for r in plan.results]
    report["quantization"] = dict(streamer.run(plan), kind=streamer.fmt, source="quantized on load")


def _load_prequantized(model, ckpt, device, compute_device, base_dtype, report,
                       fp8_matmul: str) -> set[str]:
    """Quantized layers of the file become QuantLinear modules holding the file's own tensors."""
    dtypes = {k: info.dtype for k, info in ckpt.tensors.items()}
    detected = detect_quantization(ckpt.lazy(), ckpt.metadata, dtypes=dtypes)
    if not detected["layers"]:
        return set()
    result = load_quantized_state(model, ckpt.lazy(), ckpt.metadata, compute_device,
                                  storage_device=device, detected=detected, compute_dtype=base_dtype,
                                  fp8_matmul=fp8_matmul)
    report["quantization"] = dict(result["report"], kind=detected["kind"], source="file",
                                  counts=detected["counts"])
    return set(result["consumed_keys"])


def _refuse_requantizing(ckpt, report) -> None:
    if report["quantization"]:
        raise ValueError(f"{ckpt.name} is already quantized ({report['quantization']['kind']}); "
                         f"choose quantization 'none' to load it as it is")


def _quantize_on_load(model, ckpt, quantization, device, compute_device, base_dtype, report,
                      fp8_matmul: str) -> None:
    _refuse_requantizing(ckpt, report)
    report["quantization"] = dict(quantize_model(model, quantization, compute_device,
                                                 storage_device=device, compute_dtype=base_dtype,
                                                 fp8_matmul=fp8_matmul),
                                  kind=quantization, source="quantized on load")


def _merge_loras(model, loras, device) -> list[dict]:
    results = merge_loras(model, list(loras), device=device)
    return [vars(r) if hasattr(r, "__dict__") else r for r in results]


def _quantized_elements(model) -> int:
    """Weights held in quantized buffers count as parameters in the report (logical elements)."""
    total = 0
    for module in model.modules():
        if hasattr(module, "dequantize") and hasattr(module, "in_features"):
            total += module.in_features * module.out_features
    return total


def _apply_extensions(model, ckpt, extra, patch, device, base_dtype, report,
                      inject: LayerInjector | None, streamer: QuantizeWhileLoading | None) -> None:
    """InfiniteTalk layers merged in the file or given as a patch; leftover keys are reported."""
    if inject is not None:
        patch_ckpt = open_checkpoint(patch) if patch else None
        attach = {} if streamer is None else {"attach": streamer.attach}
        report["infinitetalk"], extra = inject(model, ckpt, extra, patch_ckpt, device, base_dtype,
                                               **attach)
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
