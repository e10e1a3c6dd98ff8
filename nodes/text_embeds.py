"""WanVideo Save / Load Text Embeds: keep umT5 prompt embeddings as a small safetensors file, so
the 11 GB text encoder need not be loaded for every run (models/text_embeds)."""
from __future__ import annotations

import json
import os

import torch
from comfy_api.latest import io, ui

from .validation import not_listed, resolve

CATEGORY = "WanVideo InfiniteTalk"
FOLDER = "text_embeds"
FORMAT = "wanvideo_text_embeds"
TEXT_DIM = 4096


def register_folder() -> None:
    """models/text_embeds (idempotent; called when a node is defined or run, not at import)."""
    import folder_paths

    path = os.path.join(folder_paths.models_dir, FOLDER)
    if path not in folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))[0]:
        folder_paths.add_model_folder_path(FOLDER, path, is_default=True)
    folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")


def conditioning_tensor(conditioning, name: str) -> torch.Tensor:
    """CONDITIONING (list of [tensor [1, L, 4096], dict]) -> its first context [1, L, 4096]."""
    try:
        t = conditioning[0][0]
    except (TypeError, IndexError, KeyError):
        raise ValueError(f"{name}: expected a CONDITIONING from CLIPTextEncode (umT5 / wan)") from None
    if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[-1] != TEXT_DIM:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: text context {shape} is not umT5 [1, L, {TEXT_DIM}]; encode the "
                         "prompt with the Wan umT5 text encoder (CLIPLoader type 'wan')")
    return t[:1].float().cpu()


def to_conditioning(t: torch.Tensor) -> list:
    return [[t, {}]]


def read_embeds(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..wanvideo.checkpoint import CheckpointError, load_tensors, read_header

    name = os.path.basename(path)
    try:
        infos, meta = read_header(path)
        if meta.get("format") != FORMAT or not {"positive", "negative"} <= infos.keys():
            raise ValueError(f"{name} is not a WanVideo text embeds file (expected tensors "
                             f"'positive' and 'negative' and format={FORMAT!r}; found "
                             f"{[k[:80] for k in sorted(infos)[:6]]}); create one with WanVideo "
                             "Save Text Embeds")
        tensors = load_tensors(path)
    except CheckpointError as e:
        detail = str(e).removeprefix(name + ": ")
        raise ValueError(f"{name} cannot be read as safetensors: {detail}") from None
    pos, neg = tensors["positive"], tensors["negative"]
    for label, t in (("positive", pos), ("negative", neg)):
        if t.ndim != 3 or t.shape[0] != 1 or t.shape[-1] != TEXT_DIM:
            raise ValueError(f"{name}: {label} embeds have shape {tuple(t.shape)}; expected "
                             f"[1, L, {TEXT_DIM}]")
    return pos.float(), neg.float()


def write_embeds(path: str, positive: torch.Tensor, negative: torch.Tensor,
                 prompts: dict | None = None) -> str:
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    meta = {"format": FORMAT, "version": "1"}
    if prompts:
        meta["prompts"] = json.dumps(prompts)
    save_file({"positive": positive.contiguous(), "negative": negative.contiguous()}, path,
              metadata=meta)
    return path


class WanVideoSaveTextEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folder()
        return io.Schema(
            node_id="WanVideoSaveTextEmbeds",
            display_name="WanVideo Save Text Embeds",
            category=CATEGORY,
            description="Saves positive and negative umT5 prompt embeddings to "
                        "models/text_embeds, to be reloaded without the text encoder.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive prompt from CLIPTextEncode "
                                      "with the Wan umT5 text encoder."),
                io.Conditioning.Input("negative", tooltip="Negative prompt from CLIPTextEncode "
                                      "with the Wan umT5 text encoder."),
                io.String.Input("filename_prefix", default="wan_prompt",
                                tooltip="File name prefix inside models/text_embeds; a counter "
                                        "and .safetensors are appended."),
            ],
            outputs=[io.String.Output(display_name="filename",
                                      tooltip="The file written, relative to models/text_embeds.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, positive, negative, filename_prefix: str = "wan_prompt") -> io.NodeOutput:
        import folder_paths

        register_folder()
        pos = conditioning_tensor(positive, "positive")
        neg = conditioning_tensor(negative, "negative")
        prefix = (filename_prefix or "wan_prompt").strip().replace("\\", "/")
        if prefix.startswith("/") or ".." in prefix.split("/"):
            raise ValueError(f"filename_prefix {filename_prefix!r} must stay inside models/text_embeds")
        folder = folder_paths.get_folder_paths(FOLDER)[0]
        n = 1
        while os.path.exists(os.path.join(folder, f"{prefix}_{n:05d}.safetensors")):
            n += 1
        rel = f"{prefix}_{n:05d}.safetensors"
        write_embeds(os.path.join(folder, rel), pos, neg)
        return io.NodeOutput(rel, ui=ui.PreviewText(f"saved models/{FOLDER}/{rel}"))


class WanVideoLoadTextEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        import folder_paths

        register_folder()
        return io.Schema(
            node_id="WanVideoLoadTextEmbeds",
            display_name="WanVideo Load Text Embeds",
            category=CATEGORY,
            description="Loads positive and negative prompt embeddings saved by WanVideo Save "
                        "Text Embeds from models/text_embeds.",
            inputs=[io.Combo.Input(
                "embeds", options=folder_paths.get_filename_list(FOLDER),
                tooltip="A .safetensors file in models/text_embeds written by WanVideo Save "
                        "Text Embeds.")],
            outputs=[
                io.Conditioning.Output(display_name="positive", tooltip="Positive prompt "
                                       "embeddings as CONDITIONING."),
                io.Conditioning.Output(display_name="negative", tooltip="Negative prompt "
                                       "embeddings as CONDITIONING."),
            ],
        )

    @classmethod
    def validate_inputs(cls, embeds=None) -> bool | str:
        import folder_paths

        register_folder()
        if embeds is None:
            return True
        return not_listed(embeds, folder_paths.get_filename_list(FOLDER), f"models/{FOLDER}",
                          "text embeds") or True

    @classmethod
    def execute(cls, embeds: str) -> io.NodeOutput:
        register_folder()
        path = resolve(FOLDER, embeds, "embeds")
        pos, neg = read_embeds(path)
        return io.NodeOutput(to_conditioning(pos), to_conditioning(neg))
