"""Detect InfiniteTalk weights and add its layers to a loaded WanModel.

Per block: `norm_x` (affine LayerNorm, eps 1e-6) and `audio_cross_attn`; on the model: `audio_proj`.
Layers are built on the meta device and materialized through `placement.attach_module` (or the
loader's stand-in for it when quantizing while loading), so every weight lands in fresh aligned
storage in the model's base precision (fp8 patches are up-cast; a ComfyUI `scale_weight` is
applied first). Detection is by key, never by file name.
"""
from __future__ import annotations

import json
import os
import re
from typing import Iterable, Iterator, Mapping

import torch

from ..wanvideo import placement
from ..wanvideo.checkpoint import CheckpointError
from ..wanvideo.key_layouts import COMFY_PREFIXES
from ..wanvideo.model import WanLayerNorm
from .audio_attention import AudioCrossAttention
from .audio_proj import WAV2VEC_LAYERS, AudioProjModel
from .audio_windows import WINDOW

MARKER = "audio_proj.proj1.weight"
PREFIXES = COMFY_PREFIXES + ("",)   # ComfyUI-style names first, then bare keys
_AUDIO_KEY = re.compile(r"^(?:audio_proj\.|blocks\.(\d+)\.(?:norm_x|audio_cross_attn)\.)")
_SPEAKER_FIELDS = ("speakers", "num_speakers", "n_speakers", "infinitetalk_speakers", "human_num")


def is_audio_key(key: str) -> bool:
    return _AUDIO_KEY.match(key) is not None


def _prefix_of(keys: set[str]) -> str | None:
    for prefix in PREFIXES:
        if prefix + MARKER in keys:
            return prefix
    return None


def speakers_hint(metadata: Mapping[str, str] | None) -> str | None:
    """'single' / 'multi' when the safetensors metadata says so; the two variants have identical
    keys, so nothing else can tell them apart."""
    if not metadata:
        return None
    for field in _SPEAKER_FIELDS:
        if field in metadata:
            try:
                return "multi" if int(str(metadata[field]).strip()) > 1 else "single"
            except ValueError:
                pass
    text = json.dumps(dict(metadata)).lower()
    if "multi" in text:
        return "multi"
    if "single" in text:
        return "single"
    return None


def detect_infinitetalk(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> dict | None:
    """None when `keys` hold no InfiniteTalk layers, else what they hold."""
    keys = set(keys)
    prefix = _prefix_of(keys)
    if prefix is None:
        return None
    stripped = [k[len(prefix):] for k in keys if k.startswith(prefix)]
    audio = sorted(k for k in stripped if is_audio_key(k) and not k.endswith(".scale_weight"))
    blocks = {int(m.group(1)) for m in map(_AUDIO_KEY.match, audio) if m and m.group(1) is not None}
    return {
        "prefix": prefix,
        "keys_found": len(audio),
        "blocks": len(blocks),
        "other_keys": len(keys) - len(audio),
        "speakers": speakers_hint(metadata),
    }


class _PatchView(Mapping[str, torch.Tensor]):
    """The patch's tensors under `prefix`, unprefixed, read on access; fp8 weights with a
    ComfyUI `scale_weight` come back already multiplied by it (in fp32)."""

    def __init__(self, source: Mapping[str, torch.Tensor], prefix: str):
        self.source, self.prefix = source, prefix
        self.names = [k[len(prefix):] for k in source.keys() if k.startswith(prefix)]

    def __getitem__(self, key: str) -> torch.Tensor:
        value = self.source[self.prefix + key]
        scale_key = self.prefix + key.rsplit(".", 1)[0] + ".scale_weight"
        if key.endswith(".weight") and scale_key in self.source:
            value = value.float() * self.source[scale_key].float()
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __contains__(self, key) -> bool:
        return (self.prefix + key) in self.source


def _shape(source: Mapping[str, torch.Tensor], key: str):
    ckpt = getattr(source, "ckpt", None)  # wanvideo.checkpoint.LazyTensors: header only
    if ckpt is not None and key in ckpt.tensors:
        return tuple(ckpt.tensors[key].shape)
    return tuple(source[key].shape)


def _model_dtype(model) -> torch.dtype:
    dtype = getattr(model, "compute_dtype", None) or getattr(model, "dtype", None)
    return dtype if isinstance(dtype, torch.dtype) else torch.bfloat16


def inject_infinitetalk(model, state_dict: Mapping[str, torch.Tensor], device,
                        where: str = "state dict", dtype: torch.dtype | None = None,
                        metadata: Mapping[str, str] | None = None, attach=None) -> dict:
    """Add norm_x + audio_cross_attn to every block and audio_proj to `model`, filled from
    `state_dict` (original keys, optionally ComfyUI-prefixed; extra base keys are ignored).
    Raises CheckpointError naming `where` for a patch without audio keys or for mismatched dims.
    `attach`: placement.attach_module or the loader's stand-in for it (quantizing on load)."""
    info = detect_infinitetalk(state_dict.keys(), metadata)
    if info is None:
        raise CheckpointError(f"{where}: no InfiniteTalk audio keys ({MARKER!r} is missing); "
                              "this file is not an InfiniteTalk patch")
    cfg = model.config
    view = _PatchView(state_dict, info["prefix"])
    q_key = "blocks.0.audio_cross_attn.q_linear.weight"
    if q_key not in view:
        raise CheckpointError(f"{where}: InfiniteTalk patch has audio_proj but no {q_key!r}")
    patch_dim = _shape(state_dict, info["prefix"] + q_key)[0]
    if patch_dim != cfg.dim:
        raise CheckpointError(f"{where}: InfiniteTalk patch is for a model of dim {patch_dim}, but "
                              f"the base model has dim {cfg.dim}")
    if info["blocks"] != cfg.num_layers:
        raise CheckpointError(f"{where}: InfiniteTalk patch covers {info['blocks']} blocks, but the "
                              f"base model has {cfg.num_layers}")
    base = dtype or _model_dtype(model)
    device = torch.device(device)
    attach_module = attach or placement.attach_module

    def dtype_for(name, src):
        return base if src.is_floating_point() else None

    def attach(parent, name, child, prefix):
        sub = _PatchView(view, prefix)
        try:
            attach_module(parent, name, child, sub, device, dtype_for=dtype_for,
                          where=f"{where} ({prefix.rstrip('.')})")
        except (KeyError, ValueError) as exc:
            raise CheckpointError(str(exc.args[0]) if exc.args else str(exc)) from None

    for i, block in enumerate(model.blocks):
        with torch.device("meta"):
            norm = WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
            attn = AudioCrossAttention(cfg.dim, cfg.num_heads)
        attach(block, "norm_x", norm, f"blocks.{i}.norm_x.")
        attach(block, "audio_cross_attn", attn, f"blocks.{i}.audio_cross_attn.")
    intermediate = _shape(state_dict, info["prefix"] + "audio_proj.proj2.weight")[0]
    # The audio encoder's width follows from proj1 (5 frames x 12 layers x channels): 768 for
    # chinese-wav2vec2-base, smaller for the tiny test encoder.
    channels = _shape(state_dict, info["prefix"] + MARKER)[1] // (WINDOW * WAV2VEC_LAYERS)
    with torch.device("meta"):
        proj = AudioProjModel(intermediate=intermediate, channels=channels)
    attach(model, "audio_proj", proj, "audio_proj.")
    placement.verify(model, f"InfiniteTalk injection from {where}")
    return {
        "source": where,
        "keys_found": info["keys_found"],
        "blocks_patched": len(model.blocks),
        "speakers": info["speakers"],
        "base_keys_in_patch": info["other_keys"],
        "dtype": str(base).replace("torch.", ""),
    }


def apply_infinitetalk_from_checkpoints(model, ckpt, extra: list[str], patch_ckpt, device,
                                        base_dtype: torch.dtype,
                                        attach=None) -> tuple[dict | None, list[str]]:
    """Loader hook (wanvideo.loader.LayerInjector): inject from a separate patch checkpoint when
    given, else from InfiniteTalk keys merged into the base checkpoint; `attach` is the loader's
    stand-in for placement.attach_module (quantizing while loading). Returns (report, keys still
    unused)."""
    if patch_ckpt is not None:
        name = os.path.basename(patch_ckpt.files[0])
        info = inject_infinitetalk(model, patch_ckpt.lazy(), device, where=name, dtype=base_dtype,
                                   metadata=patch_ckpt.metadata, attach=attach)
    elif detect_infinitetalk(extra) is not None:
        info = inject_infinitetalk(model, ckpt.lazy(), device, where=ckpt.name, dtype=base_dtype,
                                   metadata=ckpt.metadata, attach=attach)
    else:
        return None, extra
    return info, [k for k in extra if not is_audio_key(k)]
