"""WanVideo Model Loader: a Wan2.1 (+InfiniteTalk) transformer checkpoint -> WANVIDEOMODEL."""
from __future__ import annotations

import logging
import os

import torch
from comfy_api.latest import io

from ..wanvideo.attention import BACKENDS, describe_backend
from ..wanvideo.loader import BASE_DTYPES, QUANTIZE_CHOICES
from ..wanvideo.quant_linear import FP8_MATMUL
from .model_files import patch_path
from .model_handle import WanVideoModelHandle
from .types import INFINITETALK_PATCH, WANVIDLORA
from .validation import lora_chain, not_listed, resolve

CATEGORY = "WanVideo InfiniteTalk"
WANVIDEOMODEL = io.Custom("WANVIDEOMODEL")

PRECISIONS = dict(BASE_DTYPES)
ATTENTIONS = list(BACKENDS)
LOAD_DEVICES = ["main_device", "offload_device"]
QUANTIZATIONS = list(QUANTIZE_CHOICES)
FP8_MATMULS = list(FP8_MATMUL)

log = logging.getLogger(__name__)

# Report keys worth a log line, in this order; anything else the loader reports still reaches the
# Model Info node.
_LOGGED = ("model_type", "config", "stored_dtype", "base_dtype", "quantization", "infinitetalk",
           "loras", "parameters")


def _compute_device() -> torch.device:
    import comfy.model_management as mm

    return mm.get_torch_device()


def _patch_path(patch) -> str | None:
    """The patch file, resolved again from its listed name (a value typed into the prompt
    instead of a link cannot name an arbitrary path)."""
    if patch is None:
        return None
    name = getattr(patch, "name", None)
    if not isinstance(name, str):
        raise ValueError("infinitetalk: expected a patch from InfiniteTalk Model Loader, got "
                         f"{type(patch).__name__}")
    return patch_path(name)


def _brief(key: str, value):
    """A log-sized form of a report entry (LoRA results list every merged layer)."""
    if key == "loras" and isinstance(value, list):
        return [f"{r.get('name')} strength {r.get('strength')}: {len(r.get('merged', []))} layers"
                f"{', %d unknown keys' % len(r['unknown']) if r.get('unknown') else ''}"
                for r in value if isinstance(r, dict)]
    return value


def _devices(load_device: str) -> tuple[torch.device, torch.device]:
    import comfy.model_management as mm

    main, offload = mm.get_torch_device(), mm.unet_offload_device()
    return (main if load_device == "main_device" else offload), offload


class WanVideoModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="WanVideoModelLoader",
            display_name="WanVideo Model Loader",
            category=CATEGORY,
            description="Loads a Wan2.1 transformer checkpoint from models/diffusion_models, "
                        "injects an InfiniteTalk patch, merges LoRAs and quantizes (in that "
                        "order), and reports what it detected.",
            inputs=[
                io.Combo.Input(
                    "model", options=folder_paths.get_filename_list("diffusion_models"),
                    tooltip="Wan2.1 transformer checkpoint (.safetensors) from "
                            "models/diffusion_models. Type, size, dtype, quantization and "
                            "InfiniteTalk layers are detected from the file."),
                io.Combo.Input(
                    "base_precision", options=list(PRECISIONS), default="bf16",
                    tooltip="Compute dtype for the non-quantized weights. bf16 is the usual "
                            "choice; fp32 is slow and large, mainly for debugging."),
                io.Combo.Input(
                    "attention", options=ATTENTIONS, default="sdpa",
                    tooltip="Attention kernel. sdpa is PyTorch's built-in and always available. "
                            "int8 is the pack's 8-bit kernel (Triton; RTX 40xx / Ada and H100 / "
                            "Hopper): Q.K^T and P.V in INT8 with fp32 softmax, faster on long "
                            "videos at a small accuracy cost; what it does not cover (other GPUs, "
                            "the CPU, the short text/CLIP/audio attention) runs sdpa. auto picks "
                            "int8 where it was measured faster (Hopper, windows of 16k+ tokens: "
                            "1.09x on attention), sdpa elsewhere. "
                            "flash_attn and sageattention need their packages installed."),
                io.Combo.Input(
                    "load_device", options=LOAD_DEVICES, default="offload_device",
                    tooltip="Where the weights live after loading. offload_device (default): "
                            "ComfyUI's offload device, usually host RAM; what WanVideo BlockSwap "
                            "wants (swapped blocks are streamed from RAM, the rest is moved to "
                            "the GPU when sampling starts), and loading never needs the whole "
                            "model in VRAM. main_device: straight to the GPU; fastest when the "
                            "whole model fits in VRAM and no BlockSwap is used."),
                io.Combo.Input(
                    "quantization", options=QUANTIZATIONS, default="none", optional=True,
                    tooltip="Quantize full-precision weights while loading: fp8_e4m3fn (plain "
                            "cast), fp8_e4m3fn_scaled (a per-tensor weight scale, better quality), "
                            "nvfp4 (4-bit, Blackwell GPUs for speed). Pre-quantized files (fp8, "
                            "fp8_scaled, NVFP4) load as they are: choose none for them."),
                io.Combo.Input(
                    "fp8_matmul", options=FP8_MATMULS, default="fast", optional=True,
                    tooltip="How fp8 weights multiply on GPUs with fp8 tensor cores (RTX 40xx, "
                            "H100 and newer). fast (default): fp8 matrix multiply with the tensor "
                            "cores' own accumulation, the quickest. accurate: fp8 matrix multiply "
                            "with sums kept in fp32, a few percent slower. dequantize: weights "
                            "converted to base_precision for every layer call; slowest, for "
                            "checking a problem. Other GPUs and the CPU always dequantize."),
                INFINITETALK_PATCH.Input(
                    "infinitetalk", optional=True,
                    tooltip="InfiniteTalk patch from InfiniteTalk Model Loader. Its audio "
                            "layers are injected at load time, before LoRA merging and "
                            "quantization. Leave empty for a checkpoint with InfiniteTalk "
                            "already merged."),
                WANVIDLORA.Input(
                    "lora", optional=True,
                    tooltip="LoRAs from WanVideo LoRA Select, merged into the full-precision "
                            "weights before quantization (in chain order)."),
            ],
            outputs=[WANVIDEOMODEL.Output(
                display_name="model", tooltip="The loaded transformer and its load report.")],
        )

    @classmethod
    def validate_inputs(cls, model=None) -> bool | str:
        # ComfyUI 0.3.75 does not check V3 combo values itself; reject an unknown file before
        # anything runs (HTTP 400 with node_errors). Only `model` is declared: ComfyUI repeats a
        # failure once per declared input, and it checks the other inputs' ranges itself only
        # when they are not declared. The link-only inputs (lora, infinitetalk) are resolved by
        # name at execution, before anything is opened.
        import folder_paths

        if model is None:
            return True
        return not_listed(model, folder_paths.get_filename_list("diffusion_models"),
                          "models/diffusion_models", "model") or True

    @classmethod
    def execute(cls, model: str, base_precision: str = "bf16", attention: str = "sdpa",
                load_device: str = "offload_device", quantization: str = "none",
                fp8_matmul: str = "fast", infinitetalk=None, lora=None) -> io.NodeOutput:
        from ..multitalk.inject import apply_infinitetalk_from_checkpoints
        from ..wanvideo.loader import load_model

        for name, value, options in (("base_precision", base_precision, list(PRECISIONS)),
                                     ("attention", attention, ATTENTIONS),
                                     ("load_device", load_device, LOAD_DEVICES),
                                     ("quantization", quantization, QUANTIZATIONS),
                                     ("fp8_matmul", fp8_matmul, FP8_MATMULS)):
            if value not in options:
                raise ValueError(f"{name} {value!r} is not one of {options}")
        path = resolve("diffusion_models", model, "model")
        patch = _patch_path(infinitetalk)
        loras = [(resolve("loras", name, "lora"), s) for name, s in lora_chain(lora) if s != 0.0]
        device, offload = _devices(load_device)
        compute = _compute_device()
        # CheckpointError / LoraError / ValueError carry the library's message (file + problem)
        # and reach ComfyUI unchanged as this node's execution_error.
        loaded = load_model([path], device=device, base_dtype=PRECISIONS[base_precision],
                            attention=attention, patch=patch, quantization=quantization,
                            loras=loras, compute_device=compute, fp8_matmul=fp8_matmul,
                            inject=apply_infinitetalk_from_checkpoints)
        report = dict(loaded.report or {})
        log.info("WanVideo Model Loader: %s -> %s (compute %s, %s, attention=%s, quantization=%s, "
                 "fp8_matmul=%s, InfiniteTalk patch=%s, LoRAs=%s)", model, device, compute,
                 base_precision, attention, quantization, fp8_matmul,
                 os.path.basename(patch) if patch else "none",
                 [f"{os.path.basename(p)}@{s:g}" for p, s in loras] or "none")
        for key in _LOGGED:
            if key in report:
                log.info("  %s: %s", key, _brief(key, report[key]))
        log.info("  attention: %s", describe_backend(attention, torch.device(compute)))
        handle = WanVideoModelHandle(model=loaded.model, report=report, device=device,
                                     offload_device=offload, name=model, load_spec=dict(
                                         paths=(path,), base_dtype=PRECISIONS[base_precision],
                                         attention=attention, patch=patch,
                                         quantization=quantization, loras=tuple(loras),
                                         fp8_matmul=fp8_matmul, load_device=load_device))
        return io.NodeOutput(handle)
