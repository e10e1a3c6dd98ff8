"""WanVideo Model Loader: a Wan2.1 (+InfiniteTalk) transformer checkpoint -> WANVIDEOMODEL."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from .model_handle import WanVideoModelHandle

CATEGORY = "WanVideo InfiniteTalk"
WANVIDEOMODEL = io.Custom("WANVIDEOMODEL")

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTENTIONS = ["sdpa", "flash_attn", "sageattention"]
LOAD_DEVICES = ["main_device", "offload_device"]

log = logging.getLogger(__name__)

# Report keys worth a log line, in this order; anything else the loader reports still reaches the
# Model Info node.
_LOGGED = ("model_type", "config", "stored_dtype", "quantization", "infinitetalk", "parameters")


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
            description="Loads a Wan2.1 transformer checkpoint (optionally with InfiniteTalk "
                        "layers) from models/diffusion_models and reports what it detected.",
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
                    tooltip="Attention kernel. sdpa is PyTorch's built-in and always available; "
                            "flash_attn and sageattention need their packages installed."),
                io.Combo.Input(
                    "load_device", options=LOAD_DEVICES, default="main_device",
                    tooltip="Where the weights are placed after loading: main_device is "
                            "ComfyUI's compute device (GPU), offload_device its offload device "
                            "(usually CPU RAM; use with block swapping)."),
            ],
            outputs=[WANVIDEOMODEL.Output(
                display_name="model", tooltip="The loaded transformer and its load report.")],
        )

    @classmethod
    def validate_inputs(cls, model=None) -> bool | str:
        # ComfyUI 0.3.75 does not check V3 combo values itself; reject an unknown file before
        # anything runs (HTTP 400 with node_errors). Only `model` is declared here because ComfyUI
        # repeats a failure once per declared input.
        import folder_paths

        if model is not None and model not in folder_paths.get_filename_list("diffusion_models"):
            return f"model {model!r} is not in models/diffusion_models"
        return True

    @classmethod
    def execute(cls, model: str, base_precision: str = "bf16", attention: str = "sdpa",
                load_device: str = "main_device") -> io.NodeOutput:
        import folder_paths

        from ..wanvideo.loader import load_model

        for name, value, options in (("base_precision", base_precision, list(PRECISIONS)),
                                     ("attention", attention, ATTENTIONS),
                                     ("load_device", load_device, LOAD_DEVICES)):
            if value not in options:
                raise ValueError(f"{name} {value!r} is not one of {options}")
        path = folder_paths.get_full_path_or_raise("diffusion_models", model)
        device, offload = _devices(load_device)
        loaded = load_model([path], device=device, base_dtype=PRECISIONS[base_precision],
                            attention=attention)
        report = dict(loaded.report or {})
        log.info("WanVideo Model Loader: %s -> %s (%s, attention=%s)",
                 model, device, base_precision, attention)
        for key in _LOGGED:
            if key in report:
                log.info("  %s: %s", key, report[key])
        handle = WanVideoModelHandle(model=loaded.model, report=report, device=device,
                                     offload_device=offload, path=path)
        return io.NodeOutput(handle)
