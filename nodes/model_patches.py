"""InfiniteTalk Model Loader and WanVideo LoRA Select: pick files that the WanVideo Model Loader
applies at load time (InfiniteTalk injection, then LoRA merge, then quantization)."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from .model_files import patch_files, patch_path, register_folders
from .types import INFINITETALK_PATCH, WANVIDLORA, InfiniteTalkPatch
from .validation import lora_chain, not_listed

CATEGORY = "WanVideo InfiniteTalk"

log = logging.getLogger(__name__)


def inspect_patch(path: str) -> dict:
    """Header-only check (no weights read) that `path` holds InfiniteTalk layers."""
    from ..multitalk.inject import detect_infinitetalk
    from ..wanvideo.checkpoint import open_checkpoint

    name = os.path.basename(path)
    ckpt = open_checkpoint(path)  # CheckpointError names the file for unreadable files
    info = detect_infinitetalk(ckpt.tensors.keys(), ckpt.metadata)
    if info is None:
        wan = any(k.startswith("blocks.") and ".self_attn." in k for k in ckpt.tensors)
        what = "a Wan transformer checkpoint without InfiniteTalk layers" if wan else \
            f"not an InfiniteTalk patch (its {len(ckpt.tensors)} keys, e.g. " \
            f"{sorted(ckpt.tensors)[:3]}, hold no audio_proj / audio_cross_attn layers)"
        raise ValueError(f"{name} is {what}; choose an InfiniteTalk file such as "
                         "Wan2_1-InfiniteTalk_Single_14B_fp16.safetensors")
    return info


class InfiniteTalkModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folders()
        return io.Schema(
            node_id="InfiniteTalkModelLoader",
            display_name="InfiniteTalk Model Loader",
            category=CATEGORY,
            description="Chooses an InfiniteTalk patch (audio projection + per-block audio "
                        "cross-attention) for WanVideo Model Loader, which injects it while "
                        "loading the Wan2.1 I2V model. Only the file header is read here.",
            inputs=[io.Combo.Input(
                "model", options=patch_files(),
                tooltip="InfiniteTalk patch (.safetensors) from models/infinitetalk (or "
                        "models/diffusion_models): the single-speaker or multi-speaker release, "
                        "fp16/bf16/fp8. Detected by its keys, not its name.")],
            outputs=[INFINITETALK_PATCH.Output(
                display_name="infinitetalk",
                tooltip="The validated patch, for WanVideo Model Loader's infinitetalk input.")],
        )

    @classmethod
    def validate_inputs(cls, model=None) -> bool | str:
        if model is None:
            return True
        return not_listed(model, patch_files(), "models/infinitetalk or models/diffusion_models",
                          "InfiniteTalk patch") or True

    @classmethod
    def execute(cls, model: str) -> io.NodeOutput:
        path = patch_path(model)
        info = inspect_patch(path)
        if info["other_keys"]:
            log.warning("InfiniteTalk Model Loader: %s also holds %d non-InfiniteTalk tensors "
                        "(a merged checkpoint?); only its InfiniteTalk layers are used",
                        model, info["other_keys"])
        log.info("InfiniteTalk Model Loader: %s: %d tensors for %d blocks, speakers %s",
                 model, info["keys_found"], info["blocks"], info["speakers"] or "unknown")
        return io.NodeOutput(InfiniteTalkPatch(path=path, name=model, info=dict(info)))


class WanVideoLoraSelect(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        return io.Schema(
            node_id="WanVideoLoraSelect",
            display_name="WanVideo LoRA Select",
            category=CATEGORY,
            description="Adds a LoRA to the list WanVideo Model Loader merges into the weights "
                        "at load time (before quantization). Chain several through prev_lora.",
            inputs=[
                io.Combo.Input(
                    "lora", options=folder_paths.get_filename_list("loras"),
                    tooltip="A Wan2.1 LoRA from models/loras (kohya/comfy, diffusers or PEFT "
                            "names). Distilled LoRAs such as lightx2v step distillation allow "
                            "4-8 steps with text and audio guidance at 1."),
                io.Float.Input(
                    "strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                    tooltip="Merge strength (1.0 = as trained; 0 skips the LoRA; negative "
                            "values subtract it)."),
                WANVIDLORA.Input(
                    "prev_lora", optional=True,
                    tooltip="LoRAs chosen by another WanVideo LoRA Select; this one is merged "
                            "after them."),
            ],
            outputs=[WANVIDLORA.Output(
                display_name="lora",
                tooltip="The LoRA list, for WanVideo Model Loader's lora input or the next "
                        "WanVideo LoRA Select.")],
        )

    @classmethod
    def validate_inputs(cls, lora=None) -> bool | str:
        import folder_paths

        if lora is None:
            return True
        return not_listed(lora, folder_paths.get_filename_list("loras"), "models/loras",
                          "LoRA") or True

    @classmethod
    def execute(cls, lora: str, strength: float = 1.0, prev_lora=None) -> io.NodeOutput:
        # Names, not paths: WanVideo Model Loader resolves each through models/loras again.
        chain = lora_chain(prev_lora, "prev_lora") + lora_chain([(lora, strength)], "lora")
        return io.NodeOutput(chain)
