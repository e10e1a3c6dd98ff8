"""Full-size stand-ins for the public files the InfiniteTalk workflow reads: exact names, keys,
shapes and dtypes, random weights (values: `wanvideo/stand_in_values.py`). Meant for a big machine
that cannot download the real files; nothing here is committed or downloaded.

Layouts, and where each comes from (the keys ComfyUI 0.3.75's own loaders read):
- Wan2.1 I2V 14B, Comfy-Org repackaged: our WanModel's state dict under `model.diffusion_model.`
  (docs/REFERENCE_NOTES.md §2); bf16, or fp8 e4m3fn for block matrices and bf16 for the rest
  (tiny_models.storage_dtype, the convention of the fp8 releases).
- lightx2v rank-64 LoRA: `diffusion_model.blocks.N.<linear>.lora_down/lora_up/alpha` for every
  attention and FFN linear of the 40 blocks (the style tiny_models.tiny_lora_state_dict uses).
- umT5-XXL, ComfyUI "fp8_scaled": comfy.text_encoders.t5.T5 with umt5_config_xxl.json (every
  block has its own relative attention bias), linears fp8 e4m3fn with an fp32 `scale_weight`,
  a `scaled_fp8` marker tensor (empty, its dtype names the fp8 format), the rest bf16.
- CLIP vision ViT-H/14: comfy.clip_model.CLIPVisionModelProjection with clip_vision_config_h.json
  (transformers key names), fp16.
- Wan 2.1 VAE: tiny_vae.wan21_vae_shapes(dim=96), bf16.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .config import WAN21_14B_I2V, WanConfig
from .key_layouts import COMFY_PREFIXES
from .model import WanModel
from .quant_files import MARKER_KEY
from .stand_in_values import TensorSpec, spec, write_specs
from .tiny_models import storage_dtype
from .tiny_vae import wan21_vae_shapes

FP8 = torch.float8_e4m3fn
LORA_RANK = 64
LORA_TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                "cross_attn.k", "cross_attn.v", "cross_attn.o", "cross_attn.k_img",
                "cross_attn.v_img", "ffn.0", "ffn.2")

# umT5-XXL (comfy/text_encoders/umt5_config_xxl.json) and CLIP ViT-H/14 (clip_vision_config_h.json)
UMT5_XXL = {"vocab": 256384, "dim": 4096, "ff": 10240, "heads": 64, "layers": 24, "buckets": 32}
CLIP_H = {"dim": 1280, "ff": 5120, "layers": 32, "patch": 14, "image": 224, "projection": 1024}


def wan_shapes(cfg: WanConfig = WAN21_14B_I2V) -> dict[str, tuple[int, ...]]:
    """Original-layout keys and shapes of a Wan2.1 transformer (our WanModel, built on meta)."""
    with torch.device("meta"):
        model = WanModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def wan_transformer_specs(dtype: torch.dtype = torch.bfloat16,
                          cfg: WanConfig = WAN21_14B_I2V) -> dict[str, TensorSpec]:
    prefix = COMFY_PREFIXES[0]
    return {prefix + k: spec(k, shape, storage_dtype(k, len(shape), dtype))
            for k, shape in wan_shapes(cfg).items()}


def lora_specs(rank: int = LORA_RANK, cfg: WanConfig = WAN21_14B_I2V) -> dict[str, TensorSpec]:
    """lora_up ~ N(0, 0.01/rank) so the merged delta is ~10% of the layer's own weights."""
    shapes = wan_shapes(cfg)
    out = {}
    for i in range(cfg.num_layers):
        for target in LORA_TARGETS:
            d_out, d_in = shapes[f"blocks.{i}.{target}.weight"]
            key = f"diffusion_model.blocks.{i}.{target}"
            out[f"{key}.lora_down.weight"] = spec(key, (rank, d_in), torch.bfloat16)
            out[f"{key}.lora_up.weight"] = spec(key, (d_out, rank), torch.bfloat16,
                                                std=0.1 / rank ** 0.5)
            out[f"{key}.alpha"] = spec(key, (), torch.float32, mean=float(rank), std=0.0)
    return out


def _scaled_fp8_linear(out: dict, name: str, shape: tuple[int, int]) -> None:
    """W = W_fp8 * scale_weight: unit-scale fp8 values (fp8's best range), the 1/sqrt(fan_in)
    in the scale."""
    out[f"{name}.weight"] = spec(name, shape, FP8, std=1.0)
    out[f"{name}.scale_weight"] = spec(name, (), torch.float32, mean=shape[1] ** -0.5, std=0.0)


TOKENIZER_WORDS = ("a person talks to the camera in calm friendly way natural lip movements that "
                   "follow speech subtle head motion and blinking soft studio light sharp details "
                   "bright tones static blurred subtitles style artwork still picture gray quality")


def tokenizer_model() -> bytes:
    """A small but valid sentencepiece model (ComfyUI tokenizes the prompt with the file's own
    `spiece_model` tensor). The real one holds umT5's 256k-piece vocabulary (about 4.5 MB); ids of
    this one stay far below the embedding's rows. Deterministic: one thread, a fixed corpus."""
    import io
    import random
    import string

    try:
        import sentencepiece as spm
    except ImportError:  # a ComfyUI requirement; only this developer tool needs it here
        raise RuntimeError("writing the umT5 stand-in needs the sentencepiece package (ComfyUI's "
                           "requirements install it): pip install sentencepiece") from None

    rng, words = random.Random(0), TOKENIZER_WORDS.split()
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(2000)]
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus + [string.printable] * 5), model_writer=out, vocab_size=300,
        model_type="unigram", num_threads=1, hard_vocab_limit=False, character_coverage=1.0,
        minloglevel=2)
    return out.getvalue()


def umt5_xxl_specs(c: Mapping[str, int] = UMT5_XXL) -> dict[str, TensorSpec]:
    d, ff, bf16 = c["dim"], c["ff"], torch.bfloat16
    model = tokenizer_model()
    out = {"shared.weight": spec("shared.weight", (c["vocab"], d), bf16, std=1.0),
           "spiece_model": TensorSpec((len(model),), torch.uint8, payload=model),
           MARKER_KEY: spec(MARKER_KEY, (0,), FP8),
           "encoder.final_layer_norm.weight": spec("encoder.final_layer_norm.weight", (d,), bf16)}
    for i in range(c["layers"]):
        attn, ffn = f"encoder.block.{i}.layer.0.", f"encoder.block.{i}.layer.1."
        for name in "qkvo":
            _scaled_fp8_linear(out, f"{attn}SelfAttention.{name}", (d, d))
        key = f"{attn}SelfAttention.relative_attention_bias.weight"
        out[key] = spec(key, (c["buckets"], c["heads"]), bf16, std=0.1)
        _scaled_fp8_linear(out, f"{ffn}DenseReluDense.wi_0", (ff, d))
        _scaled_fp8_linear(out, f"{ffn}DenseReluDense.wi_1", (ff, d))
        _scaled_fp8_linear(out, f"{ffn}DenseReluDense.wo", (d, ff))
        for key in (f"{attn}layer_norm.weight", f"{ffn}layer_norm.weight"):
            out[key] = spec(key, (d,), bf16)
    return out


def _clip_layer(shapes: dict, p: str, d: int, ff: int) -> None:
    for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d, d)),
                        ("self_attn.v_proj", (d, d)), ("self_attn.out_proj", (d, d)),
                        ("mlp.fc1", (ff, d)), ("mlp.fc2", (d, ff)),
                        ("layer_norm1", (d,)), ("layer_norm2", (d,))):
        shapes[f"{p}{name}.weight"] = shape
        shapes[f"{p}{name}.bias"] = (shape[0],)


def clip_vision_h_specs(c: Mapping[str, int] = CLIP_H) -> dict[str, TensorSpec]:
    d, v = c["dim"], "vision_model."
    tokens = (c["image"] // c["patch"]) ** 2 + 1
    shapes = {f"{v}embeddings.class_embedding": (d,),
              f"{v}embeddings.patch_embedding.weight": (d, 3, c["patch"], c["patch"]),
              f"{v}embeddings.position_embedding.weight": (tokens, d),
              "visual_projection.weight": (c["projection"], d)}
    for norm in ("pre_layrnorm", "post_layernorm"):
        shapes[f"{v}{norm}.weight"] = shapes[f"{v}{norm}.bias"] = (d,)
    for i in range(c["layers"]):
        _clip_layer(shapes, f"{v}encoder.layers.{i}.", d, c["ff"])
    return {k: spec(k, shape, torch.float16) for k, shape in shapes.items()}


def wan_vae_specs(dim: int = 96, dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """Gains 1 and biases 0 like tiny_vae, so the decoder's scale matches the tiny one's."""
    return {k: spec(k, shape, dtype, **({"std": 0.0} if k.endswith(".bias") else {}))
            for k, shape in wan21_vae_shapes(dim).items()}


@dataclass(frozen=True)
class StandIn:
    folder: str  # ComfyUI model folder
    build: Callable[[], Mapping[str, TensorSpec]]


STAND_INS: dict[str, StandIn] = {
    "wan2.1_i2v_480p_14B_bf16.safetensors": StandIn("diffusion_models", wan_transformer_specs),
    "wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors": StandIn(
        "diffusion_models", lambda: wan_transformer_specs(FP8)),
    "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors": StandIn("loras", lora_specs),
    "umt5_xxl_fp8_e4m3fn_scaled.safetensors": StandIn("text_encoders", umt5_xxl_specs),
    "clip_vision_h.safetensors": StandIn("clip_vision", clip_vision_h_specs),
    "wan_2.1_vae.safetensors": StandIn("vae", wan_vae_specs),
}


def stand_in_metadata(seed: int) -> dict[str, str]:
    """Says what the file is, so nobody mistakes it for the real weights."""
    return {"format": "pt", "stand_in": f"random weights, seed {seed}, not a trained model"}


def write_stand_in(models_dir: str, name: str, seed: int = 0, device=None) -> str:
    """Stream one stand-in into models_dir/<ComfyUI folder>/<public name>; returns its path."""
    entry = STAND_INS[name]
    path = os.path.join(models_dir, entry.folder, name)
    return write_specs(path, entry.build(), seed, stand_in_metadata(seed), device)
