"""Key layouts of Wan2.1 checkpoints: original, ComfyUI-prefixed and diffusers.

Everything inside the pack speaks the original layout; files in the other layouts are renamed
on read. The diffusers table follows diffusers' documented single-file conversion.
"""
from __future__ import annotations

import re
from typing import Iterable

COMFY_PREFIXES = ("model.diffusion_model.", "diffusion_model.")

# (original module path, diffusers module path); parameter leaves (weight/bias) follow unchanged.
_TOP = (
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
)
_BLOCK = (
    ("modulation", "scale_shift_table"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("norm3", "norm2"),  # diffusers calls the cross-attention norm norm2
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
)
_BLOCK_KEY = re.compile(r"^(blocks\.\d+\.)(.*)$")
_LEAVES = ("weight", "bias")


def _split_leaf(path: str) -> tuple[str, str]:
    head, _, leaf = path.rpartition(".")
    return (head, "." + leaf) if leaf in _LEAVES and head else (path, "")


def _rename(key: str, src: int) -> str:
    m = _BLOCK_KEY.match(key)
    prefix, rest = (m.group(1), m.group(2)) if m else ("", key)
    entries = _BLOCK if m else _TOP
    module, leaf = _split_leaf(rest)
    for pair in entries:
        if module == pair[src]:
            return prefix + pair[1 - src] + leaf
    return key


def to_diffusers(key: str) -> str:
    return _rename(key, 0)


def from_diffusers(key: str) -> str:
    return _rename(key, 1)


def strip_comfy_prefix(key: str) -> str:
    for prefix in COMFY_PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def detect_layout(keys: Iterable[str]) -> str:
    """'comfy' (prefixed), 'diffusers' or 'original'; decided by marker keys, never file names."""
    keys = list(keys)
    if any(k.startswith(COMFY_PREFIXES) for k in keys):
        return "comfy"
    if any(k.startswith("condition_embedder.") or ".attn1." in k or k == "proj_out.weight" for k in keys):
        return "diffusers"
    return "original"


def to_original(key: str, layout: str) -> str:
    if layout == "comfy":
        key = strip_comfy_prefix(key)
        return from_diffusers(key) if ".attn1." in key or key.startswith("condition_embedder.") else key
    if layout == "diffusers":
        return from_diffusers(key)
    return key
