"""Wan2.1 transformer configuration, inferred from weight shapes (docs/REFERENCE_NOTES.md §1)."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

# I2V image conditioning: CLIP ViT-H penultimate hidden states, 257 tokens of width 1280.
CLIP_TOKENS = 257
CLIP_DIM = 1280


def latent_tokens(latent_shape: Sequence[int], patch: Sequence[int] = (1, 2, 2)) -> int:
    """Transformer tokens of latents [..., F_lat, h, w] (or a condition y of that shape) under
    the patch size: the sequence length every block attends over."""
    f, h, w = (int(v) for v in latent_shape[-3:])
    return (f // int(patch[0])) * (h // int(patch[1])) * (w // int(patch[2]))

HEAD_DIM = 128


@dataclass(frozen=True)
class WanConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    in_dim: int
    out_dim: int
    text_dim: int = 4096
    freq_dim: int = 256
    eps: float = 1e-6
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_len: int = 512
    clip_dim: int = 1280
    has_image_embedding: bool = False

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def model_type(self) -> str:
        return "i2v" if self.has_image_embedding else "t2v"

    def summary(self) -> dict:
        keys = ("dim", "ffn_dim", "num_heads", "num_layers", "in_dim", "out_dim", "text_dim", "freq_dim")
        full = asdict(self)
        return {k: full[k] for k in keys}


WAN21_14B_I2V = WanConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36,
                          out_dim=16, has_image_embedding=True)

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


class ConfigError(ValueError):
    pass


def infer_config(shapes: Mapping[str, Sequence[int]], head_dim: int = HEAD_DIM,
                 where: str = "checkpoint") -> WanConfig:
    """Every number comes from a tensor shape; `shapes` uses the original key layout."""
    def need(key: str) -> Sequence[int]:
        if key not in shapes:
            raise ConfigError(f"{where}: missing key {key!r}; not a Wan2.1 transformer checkpoint")
        return shapes[key]

    patch = need("patch_embedding.weight")
    if len(patch) != 5:
        raise ConfigError(f"{where}: patch_embedding.weight has shape {tuple(patch)}, "
                          "expected [dim, in_dim, pt, ph, pw]")
    dim, in_dim = int(patch[0]), int(patch[1])
    layers = {int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))}
    if not layers:
        raise ConfigError(f"{where}: no 'blocks.N.' keys; not a Wan2.1 transformer checkpoint")
    if layers != set(range(len(layers))):
        raise ConfigError(f"{where}: block indices are not contiguous 0..{max(layers)}")
    head = need("head.head.weight")
    out_dim = int(head[0]) // (int(patch[2]) * int(patch[3]) * int(patch[4]))
    heads = dim // head_dim if dim % head_dim == 0 else None
    if heads is None:
        raise ConfigError(f"{where}: dim {dim} is not a multiple of the head size {head_dim}")
    return WanConfig(
        dim=dim,
        ffn_dim=int(need("blocks.0.ffn.0.weight")[0]),
        num_heads=heads,
        num_layers=len(layers),
        in_dim=in_dim,
        out_dim=out_dim,
        text_dim=int(need("text_embedding.0.weight")[1]),
        freq_dim=int(need("time_embedding.0.weight")[1]),
        patch_size=(int(patch[2]), int(patch[3]), int(patch[4])),
        clip_dim=int(shapes["img_emb.proj.0.weight"][0]) if "img_emb.proj.0.weight" in shapes else 1280,
        has_image_embedding=any(k.startswith("img_emb.") for k in shapes),
    )
