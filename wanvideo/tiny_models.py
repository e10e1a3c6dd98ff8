"""Deterministic tiny Wan2.1 checkpoints with the real key layouts, for tests and the demo.

Dims are scaled down (dim 256, 2 heads of 128, 2 blocks) but text (4096), CLIP (1280), latent
(16 + 20) and head sizes are the real ones, so ComfyUI's own encoders plug in unchanged.
Weights are rounded to values that float8 e4m3/e5m2, fp16 and bf16 all represent exactly, so every
layout/dtype variant loads to bit-identical weights.
"""
from __future__ import annotations

import json
import os
from typing import Mapping

import torch
from safetensors.torch import save_file

from .config import WanConfig
from .key_layouts import to_diffusers
from .model import WanModel
from .tiny_vae import write_tiny_wan_vae

TINY_I2V = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=36, out_dim=16,
                     has_image_embedding=True)
TINY_T2V = WanConfig(dim=256, ffn_dim=512, num_heads=2, num_layers=2, in_dim=16, out_dim=16)


def exact_in_all_dtypes(t: torch.Tensor) -> torch.Tensor:
    """Round to values that survive fp8 e5m2 and e4m3fn round trips unchanged (so bf16/fp16 too)."""
    w = t.float().clamp(-400, 400).to(torch.float8_e5m2).float()
    w = w.to(torch.float8_e4m3fn).float()
    ok = w.to(torch.float8_e5m2).float() == w
    return torch.where(ok, w, torch.zeros_like(w))


def random_state_dict(cfg: WanConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the original layout: linears ~ 1/sqrt(fan_in), norms ~ 1."""
    gen = torch.Generator().manual_seed(seed)
    model = WanModel(cfg)
    out = {}
    for name, p in model.state_dict().items():
        if name.endswith(("norm_q.weight", "norm_k.weight", "norm_k_img.weight")) or (
                p.dim() == 1 and name.endswith("weight")):
            value = 1.0 + 0.1 * torch.randn(p.shape, generator=gen)
        elif name.endswith("modulation"):
            value = 0.1 * torch.randn(p.shape, generator=gen)
        elif p.dim() >= 2:
            fan_in = p[0].numel()
            value = torch.randn(p.shape, generator=gen) / fan_in ** 0.5
        else:
            value = 0.02 * torch.randn(p.shape, generator=gen)
        out[name] = exact_in_all_dtypes(value)
    return out


def convert_layout(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    if layout == "original":
        return dict(sd)
    if layout == "comfy":
        return {f"model.diffusion_model.{k}": v for k, v in sd.items()}
    if layout == "diffusers":
        return {to_diffusers(k): v for k, v in sd.items()}
    raise ValueError(f"unknown layout {layout!r}")


def storage_dtype(key: str, ndim: int, dtype: torch.dtype) -> torch.dtype:
    """fp8 files store block matrices in fp8 and the rest in bf16, like real fp8 releases."""
    fp8 = dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if fp8 and not (".blocks." in f".{key}" and ndim == 2):
        return torch.bfloat16
    return dtype


def cast_for_storage(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(storage_dtype(k, v.dim(), dtype)).contiguous() for k, v in sd.items()}


def write_checkpoint(sd: Mapping[str, torch.Tensor], path: str, layout: str = "original",
                     dtype: torch.dtype = torch.bfloat16, shards: int = 1) -> list[str]:
    tensors = convert_layout(cast_for_storage(sd, dtype), layout)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if shards == 1:
        save_file(tensors, path)
        return [path]
    keys = list(tensors)
    stem = path[: -len(".safetensors")]
    files, index = [], {}
    for i in range(shards):
        name = f"{stem}-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}
        save_file(part, name)
        files.append(name)
        index.update({k: os.path.basename(name) for k in part})
    with open(f"{stem}.safetensors.index.json", "w") as f:
        json.dump({"weight_map": index}, f, indent=1, sort_keys=True)
    return files


VARIANTS = (
    # (file name, layout, dtype, shards)
    ("wan21_tiny_i2v.safetensors", "original", torch.bfloat16, 1),
    ("wan21_tiny_i2v_comfy_fp16.safetensors", "comfy", torch.float16, 1),
    ("wan21_tiny_i2v_diffusers_fp32.safetensors", "diffusers", torch.float32, 1),
    ("wan21_tiny_i2v_fp8_e4m3fn.safetensors", "comfy", torch.float8_e4m3fn, 1),
    ("wan21_tiny_i2v_fp8_e5m2.safetensors", "original", torch.float8_e5m2, 1),
    ("wan21_tiny_i2v_sharded/diffusion_pytorch_model.safetensors", "original", torch.bfloat16, 2),
)


def write_tiny_models(models_dir: str, seed: int = 0) -> dict[str, str]:
    """Write wanvideo's tiny models (transformers, LoRAs, VAE) into a ComfyUI-style models folder;
    returns name -> path. multitalk.tiny.write_all_tiny_models adds the InfiniteTalk patches and
    the wav2vec2 folder the nodes also need."""
    written = {}
    i2v = random_state_dict(TINY_I2V, seed)
    dm = os.path.join(models_dir, "diffusion_models")
    for name, layout, dtype, shards in VARIANTS:
        files = write_checkpoint(i2v, os.path.join(dm, name), layout, dtype, shards)
        written[name] = files[0]
    t2v = random_state_dict(TINY_T2V, seed + 1)
    written["wan21_tiny_t2v.safetensors"] = write_checkpoint(
        t2v, os.path.join(dm, "wan21_tiny_t2v.safetensors"))[0]
    written.update(_write_companions(models_dir, seed))
    return written


LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "ffn.0", "ffn.2")


def tiny_lora_state_dict(cfg: WanConfig, rank: int = 4, seed: int = 0,
                         prefix: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """A LoRA in the common `lora_down/lora_up/alpha` style for the tiny model."""
    gen = torch.Generator().manual_seed(seed)
    dims = {"ffn.0": (cfg.dim, cfg.ffn_dim), "ffn.2": (cfg.ffn_dim, cfg.dim)}
    out = {}
    for i in range(cfg.num_layers):
        for target in LORA_TARGETS:
            d_in, d_out = dims.get(target, (cfg.dim, cfg.dim))
            key = f"{prefix}blocks.{i}.{target}"
            out[f"{key}.lora_down.weight"] = torch.randn(rank, d_in, generator=gen) / d_in ** 0.5
            out[f"{key}.lora_up.weight"] = torch.randn(d_out, rank, generator=gen) * 0.01
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    return {k: v.to(torch.bfloat16) if v.dim() else v for k, v in out.items()}


def _write_loras(models_dir: str, seed: int) -> dict[str, str]:
    folder = os.path.join(models_dir, "loras")
    os.makedirs(folder, exist_ok=True)
    good = os.path.join(folder, "wan21_tiny_lora.safetensors")
    save_file(tiny_lora_state_dict(TINY_I2V, seed=seed), good)
    # Same key style, different model: no layer of the tiny Wan model matches.
    other = {f"lora_unet_down_blocks_0_attentions_0_proj_in.{leaf}": torch.zeros(shape)
             for leaf, shape in (("lora_down.weight", (4, 32)), ("lora_up.weight", (32, 4)))}
    wrong = os.path.join(folder, "not_wan_lora.safetensors")
    save_file(other, wrong)
    return {"wan21_tiny_lora.safetensors": good, "not_wan_lora.safetensors": wrong}


def _write_companions(models_dir: str, seed: int) -> dict[str, str]:
    """The LoRAs and the VAE that go with the tiny transformers."""
    out = _write_loras(models_dir, seed)
    path = os.path.join(models_dir, "vae", "wan21_tiny_vae.safetensors")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_tiny_wan_vae(path, seed=seed)
    out["wan21_tiny_vae.safetensors"] = path
    return out
