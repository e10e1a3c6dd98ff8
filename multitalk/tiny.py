"""Tiny, deterministic InfiniteTalk patches and wav2vec2 folders for tests and smoke runs, and
`write_all_tiny_models`, which writes them next to wanvideo's tiny models (the full set the nodes
read; `python -m wanvideo.make_tiny` and scripts/comfy_harness.py use it).

The patch has exactly the InfiniteTalk keys (2 per block norm, 6 per block attention, 10 for the
audio projection) for a base model of the given dim / num_layers. The audio projection keeps the
real input widths (5*12*768, 8*12*768) and output (32 x 768); `intermediate` may be shrunk to keep
files small (the injector reads it from the shapes).
"""
from __future__ import annotations

import json
import os

import torch

from ..wanvideo.safetensors_writer import write_safetensors
from ..wanvideo.tiny_models import TINY_I2V, exact_in_all_dtypes, write_tiny_models
from .audio_proj import AUDIO_TOKEN_DIM, TOKENS_PER_SPEAKER, WAV2VEC_DIM, WAV2VEC_LAYERS
from .audio_windows import LATER_ENTRIES, WINDOW


def infinitetalk_shapes(dim: int, num_layers: int, intermediate: int = 512,
                        channels: int = WAV2VEC_DIM) -> dict[str, tuple]:
    shapes = {}
    for i in range(num_layers):
        p = f"blocks.{i}."
        shapes[p + "norm_x.weight"] = (dim,)
        shapes[p + "norm_x.bias"] = (dim,)
        for name, shape in (("q_linear", (dim, dim)), ("kv_linear", (2 * dim, AUDIO_TOKEN_DIM)),
                            ("proj", (dim, dim))):
            shapes[f"{p}audio_cross_attn.{name}.weight"] = shape
            shapes[f"{p}audio_cross_attn.{name}.bias"] = (shape[0],)
    feat = WAV2VEC_LAYERS * channels
    for name, shape in (("proj1", (intermediate, WINDOW * feat)),
                        ("proj1_vf", (intermediate, LATER_ENTRIES * feat)),
                        ("proj2", (intermediate, intermediate)),
                        ("proj3", (TOKENS_PER_SPEAKER * AUDIO_TOKEN_DIM, intermediate))):
        shapes[f"audio_proj.{name}.weight"] = shape
        shapes[f"audio_proj.{name}.bias"] = (shape[0],)
    shapes["audio_proj.norm.weight"] = (AUDIO_TOKEN_DIM,)
    shapes["audio_proj.norm.bias"] = (AUDIO_TOKEN_DIM,)
    return shapes


def infinitetalk_state_dict(dim: int, num_layers: int, seed: int = 0, intermediate: int = 32,
                            channels: int = WAV2VEC_DIM) -> dict[str, torch.Tensor]:
    """Random weights (~1/sqrt(fan_in); norms ~1), exactly representable in fp8/fp16/bf16."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in infinitetalk_shapes(dim, num_layers, intermediate, channels).items():
        if len(shape) == 2:
            v = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        elif key.endswith("norm_x.weight") or key.endswith("norm.weight"):
            v = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            v = 0.02 * torch.randn(shape, generator=gen)
        out[key] = exact_in_all_dtypes(v)
    return out


def write_infinitetalk_patch(path: str, dim: int, num_layers: int, speakers: int = 1,
                             dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                             intermediate: int = 32, prefix: str = "", metadata: dict | None = None,
                             data_start_mod16: int = 8, channels: int = WAV2VEC_DIM) -> str:
    """A patch file like the single/multi-speaker releases (same keys; metadata tells them apart
    unless `metadata` is given explicitly, pass {} for none). Tensors start at
    `data_start_mod16` mod 16, like the reference writer's output."""
    sd = infinitetalk_state_dict(dim, num_layers, seed + (1000 if speakers > 1 else 0), intermediate,
                                 channels)
    tensors = {prefix + k: v.to(dtype).contiguous() for k, v in sd.items()}
    if metadata is None:
        metadata = {"speakers": str(speakers)}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_safetensors(path, tensors, metadata or None, data_start_mod16=data_start_mod16)
    return path


def tiny_wav2vec2_config(hidden: int = 32, layers: int = 12, heads: int = 4, conv_dim: int = 32,
                         pos_kernel: int = 16, pos_groups: int = 4) -> dict:
    """transformers-style config.json content (real conv kernels/strides: hop 320)."""
    return {
        "architectures": ["Wav2Vec2Model"], "model_type": "wav2vec2",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": 2 * hidden, "conv_dim": [conv_dim] * 7,
        "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
        "conv_bias": False, "feat_extract_norm": "group", "num_conv_pos_embeddings": pos_kernel,
        "num_conv_pos_embedding_groups": pos_groups, "hidden_act": "gelu",
        "feat_extract_activation": "gelu", "layer_norm_eps": 1e-5, "do_stable_layer_norm": False,
        "hidden_dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
        "feat_proj_dropout": 0.0, "layerdrop": 0.0, "mask_time_prob": 0.0,
        "apply_spec_augment": False, "num_feat_extract_layers": 7,
    }


def tiny_wav2vec2_state_dict(cfg: dict, seed: int = 0, pos_style: str = "old") -> dict[str, torch.Tensor]:
    """Random weights under transformers' key names; the positional conv's weight norm is stored
    as weight_g/weight_v (`old`) or parametrizations.weight.original0/1 (`new`)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=None):
        fan = shape[1] * (shape[2] if len(shape) > 2 else 1) if len(shape) > 1 else 1
        s = scale if scale is not None else fan ** -0.5
        return torch.randn(shape, generator=gen) * s

    def norm(prefix, n):
        return {prefix + "weight": 1 + 0.1 * rnd(n, scale=1.0), prefix + "bias": rnd(n, scale=0.05)}

    h, conv = cfg["hidden_size"], cfg["conv_dim"]
    sd = {}
    for i, (c, k) in enumerate(zip(conv, cfg["conv_kernel"])):
        cin = conv[i - 1] if i else 1
        sd[f"feature_extractor.conv_layers.{i}.conv.weight"] = rnd(c, cin, k)
    sd.update(norm("feature_extractor.conv_layers.0.layer_norm.", conv[0]))
    sd.update(norm("feature_projection.layer_norm.", conv[-1]))
    sd["feature_projection.projection.weight"] = rnd(h, conv[-1])
    sd["feature_projection.projection.bias"] = rnd(h, scale=0.05)
    kpos, groups = cfg["num_conv_pos_embeddings"], cfg["num_conv_pos_embedding_groups"]
    g = 1 + 0.1 * rnd(1, 1, kpos, scale=1.0)
    v = rnd(h, h // groups, kpos)
    names = ("weight_g", "weight_v") if pos_style == "old" else \
        ("parametrizations.weight.original0", "parametrizations.weight.original1")
    sd["encoder.pos_conv_embed.conv." + names[0]] = g
    sd["encoder.pos_conv_embed.conv." + names[1]] = v
    sd["encoder.pos_conv_embed.conv.bias"] = rnd(h, scale=0.05)
    sd.update(norm("encoder.layer_norm.", h))
    inter = cfg["intermediate_size"]
    for i in range(cfg["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            sd[f"{p}attention.{name}.weight"] = rnd(h, h)
            sd[f"{p}attention.{name}.bias"] = rnd(h, scale=0.05)
        sd.update(norm(p + "layer_norm.", h))
        sd[p + "feed_forward.intermediate_dense.weight"] = rnd(inter, h)
        sd[p + "feed_forward.intermediate_dense.bias"] = rnd(inter, scale=0.05)
        sd[p + "feed_forward.output_dense.weight"] = rnd(h, inter)
        sd[p + "feed_forward.output_dense.bias"] = rnd(h, scale=0.05)
        sd.update(norm(p + "final_layer_norm.", h))
    return sd


def write_tiny_wav2vec2(folder: str, seed: int = 0, pos_style: str = "old", **config) -> str:
    """A transformers-loadable folder: config.json + model.safetensors."""
    from safetensors.torch import save_file
    cfg = tiny_wav2vec2_config(**config)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    sd = {k: v.contiguous() for k, v in tiny_wav2vec2_state_dict(cfg, seed, pos_style).items()}
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


# As wide as the audio projection of the tiny patches reads (channels of proj1).
TINY_WAV2VEC_HIDDEN = 32


def write_tiny_audio_models(models_dir: str, seed: int = 0) -> dict[str, str]:
    """InfiniteTalk patches (single/multi speaker) sized for wanvideo's tiny I2V model and a tiny
    wav2vec2 folder; the patch's audio projection is sized to that encoder's width."""
    out = {}
    dm = os.path.join(models_dir, "infinitetalk")
    for speakers, name in ((1, "infinitetalk_tiny_single.safetensors"),
                           (2, "infinitetalk_tiny_multi.safetensors")):
        out[name] = write_infinitetalk_patch(os.path.join(dm, name), TINY_I2V.dim, TINY_I2V.num_layers,
                                             speakers=speakers, seed=seed,
                                             channels=TINY_WAV2VEC_HIDDEN)
    folder = os.path.join(models_dir, "wav2vec2", "tiny-wav2vec2")
    write_tiny_wav2vec2(folder, seed=seed, hidden=TINY_WAV2VEC_HIDDEN)
    out["tiny-wav2vec2"] = folder
    return out


def write_all_tiny_models(models_dir: str, seed: int = 0) -> dict[str, str]:
    """Every tiny file the pack's nodes read, in a ComfyUI-style models folder: name -> path."""
    written = write_tiny_models(models_dir, seed)
    written.update(write_tiny_audio_models(models_dir, seed))
    return written
