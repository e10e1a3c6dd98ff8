"""The image condition every window is sampled with, and the NaN/Inf guard of the video path.

Shared by the window loop (pipeline.py) and dubbing's per-window conditions (dubbing.py); it sits
below both so neither has to import the other's module to build or check a condition.
pipeline.py re-exports these names, where the nodes and tests have always found them.
"""
from __future__ import annotations

import torch

from ..wanvideo.checkpoint import all_finite, count_nonfinite

LATENT_CHANNELS = 16
MASK_CHANNELS = 4


def condition_frames(reference: torch.Tensor, clip_frames: int) -> torch.Tensor:
    """The pixels the y latents encode: the reference then clip_frames - 1 grey frames (0.5 in
    0..1, i.e. the zeros of the official [-1, 1] tensor)."""
    rest = torch.full((int(clip_frames) - 1, *reference.shape), 0.5, dtype=reference.dtype)
    return torch.cat([reference.unsqueeze(0), rest.to(reference.device)], dim=0)


def condition_y(latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [1, 16, F_lat, h, w] of condition_frames -> y [1, 20, F_lat, h, w]."""
    if latents.ndim != 5 or latents.shape[:2] != (1, LATENT_CHANNELS):
        raise ValueError(f"expected latents [1, 16, F_lat, h, w], got {tuple(latents.shape)}")
    mask = torch.zeros((1, MASK_CHANNELS, *latents.shape[2:]), dtype=latents.dtype,
                       device=latents.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)


class NonFiniteError(ValueError):
    """NaN or Inf where a video is being made; the message names the input or the window."""


def require_finite(t: torch.Tensor, what: str, hint: str = "") -> None:
    if not all_finite(t):     # one pass, no temporaries: this runs on every window's frames
        raise NonFiniteError(f"{what} holds {count_nonfinite(t):,} NaN/Inf value(s) of "
                             f"{t.numel():,}"
                             f"{'; ' + hint if hint else ''}")
