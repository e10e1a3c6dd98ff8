"""Full-size stand-ins for InfiniteTalk's own public files, and the whole set the workflow reads
(with wanvideo/stand_ins.py's transformer, LoRA, text encoder, CLIP vision and VAE): exact names,
keys, shapes and dtypes, random weights streamed to disk. `python -m wanvideo.make_full_size`
is the command line.

- `Wan2_1-InfiniTetalk-Single_fp16.safetensors` (Kijai's name, typo included): the InfiniteTalk
  keys of multitalk/tiny.infinitetalk_shapes for the 14B model (dim 5120, 40 blocks, audio
  projection width 512), no prefix, fp16.
- `chinese-wav2vec2-base/`: config.json + model.safetensors in transformers' Wav2Vec2Model layout
  for Wav2Vec2Config's defaults (the chinese-wav2vec2-base sizes), fp32 like the public
  pytorch_model.bin, positional conv weight norm as weight_g / weight_v like that file.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Iterable

import torch

from ..wanvideo.config import WAN21_14B_I2V
from ..wanvideo.stand_in_values import TensorSpec, spec, write_specs
from ..wanvideo.stand_ins import STAND_INS, stand_in_metadata, write_stand_in
from .tiny import infinitetalk_shapes
from .wav2vec2 import CHINESE_WAV2VEC2_BASE, Wav2Vec2Config

PATCH_NAME = "Wan2_1-InfiniTetalk-Single_fp16.safetensors"
WAV2VEC2_NAME = "chinese-wav2vec2-base"
AUDIO_PROJ_WIDTH = 512


def infinitetalk_patch_specs() -> dict[str, TensorSpec]:
    shapes = infinitetalk_shapes(WAN21_14B_I2V.dim, WAN21_14B_I2V.num_layers, AUDIO_PROJ_WIDTH)
    return {k: spec(k, shape, torch.float16) for k, shape in shapes.items()}


def wav2vec2_shapes(cfg: Wav2Vec2Config = CHINESE_WAV2VEC2_BASE) -> dict[str, tuple[int, ...]]:
    """transformers' Wav2Vec2Model keys for a group-norm, post-norm config (the base models)."""
    h, inter, conv = cfg.hidden_size, cfg.intermediate_size, cfg.conv_dim
    s: dict[str, tuple[int, ...]] = {"masked_spec_embed": (h,)}
    for i, (c, k) in enumerate(zip(conv, cfg.conv_kernel)):
        s[f"feature_extractor.conv_layers.{i}.conv.weight"] = (c, conv[i - 1] if i else 1, k)
        if cfg.conv_bias:
            s[f"feature_extractor.conv_layers.{i}.conv.bias"] = (c,)
    pairs = {"feature_extractor.conv_layers.0.layer_norm": conv[0],
             "feature_projection.layer_norm": conv[-1], "encoder.layer_norm": h}
    s["feature_projection.projection.weight"] = (h, conv[-1])
    s["feature_projection.projection.bias"] = (h,)
    pos, kpos = "encoder.pos_conv_embed.conv.", cfg.num_conv_pos_embeddings
    s[pos + "weight_g"] = (1, 1, kpos)
    s[pos + "weight_v"] = (h, h // cfg.num_conv_pos_embedding_groups, kpos)
    s[pos + "bias"] = (h,)
    for i in range(cfg.num_hidden_layers):
        p = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}attention.{name}.weight"], s[f"{p}attention.{name}.bias"] = (h, h), (h,)
        s[p + "feed_forward.intermediate_dense.weight"] = (inter, h)
        s[p + "feed_forward.intermediate_dense.bias"] = (inter,)
        s[p + "feed_forward.output_dense.weight"] = (h, inter)
        s[p + "feed_forward.output_dense.bias"] = (h,)
        pairs[p + "layer_norm"] = pairs[p + "final_layer_norm"] = h
    for name, width in pairs.items():
        s[f"{name}.weight"] = s[f"{name}.bias"] = (width,)
    return s


def wav2vec2_config_json(cfg: Wav2Vec2Config = CHINESE_WAV2VEC2_BASE) -> dict:
    """config.json as transformers writes it (our fields, plus what transformers needs to
    rebuild the same module: no dropout, spec-augment's mask embedding present)."""
    out = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(cfg).items()}
    out.update({"architectures": ["Wav2Vec2Model"], "model_type": "wav2vec2",
                "num_feat_extract_layers": len(cfg.conv_dim), "mask_time_prob": 0.05,
                "hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
                "feat_proj_dropout": 0.0, "layerdrop": 0.0})
    return out


def write_wav2vec2_folder(folder: str, seed: int = 0, device=None) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(wav2vec2_config_json(), f, indent=1)
    specs = {k: spec(k, shape, torch.float32) for k, shape in wav2vec2_shapes().items()}
    write_specs(os.path.join(folder, "model.safetensors"), specs, seed, stand_in_metadata(seed),
                device)
    return folder


def all_names() -> list[str]:
    return [*STAND_INS, PATCH_NAME, WAV2VEC2_NAME]


def write_full_size_stand_ins(models_dir: str, only: Iterable[str] | None = None,
                              seed: int = 0, log=print, device=None) -> dict[str, str]:
    """Write the chosen stand-ins (all by default) into a ComfyUI-style models folder, one file at
    a time; returns name -> path. `log` hears one line per file (name, size, seconds); `device`
    draws the random values there (stand_in_values.value_chunks)."""
    names = list(only) if only else all_names()
    unknown = [n for n in names if n not in all_names()]
    if unknown:
        raise ValueError(f"unknown stand-in(s) {unknown}; known: {all_names()}")
    written = {}
    for name in names:
        start = time.perf_counter()
        if name == PATCH_NAME:
            path = write_specs(os.path.join(models_dir, "infinitetalk", name),
                               infinitetalk_patch_specs(), seed, stand_in_metadata(seed), device)
        elif name == WAV2VEC2_NAME:
            path = write_wav2vec2_folder(os.path.join(models_dir, "wav2vec2", name), seed, device)
        else:
            path = write_stand_in(models_dir, name, seed, device)
        written[name] = path
        log(f"{name}: {_size(path) / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s")
    return written


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return os.path.getsize(path)
