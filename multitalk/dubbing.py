"""Dubbing: per-window image conditions from a source video (InfiniteTalk's sparse-frame mode).

Each window's reference is one source frame (reference_schedule): it is fitted to the output
size, VAE-encoded as the first of `clip` frames followed by grey frames (mask 1 on latent frame
0), and CLIP-encoded; everything else (motion frames from the previous window, audio, noise) is
image mode unchanged. Consecutive windows on the same source frame (a frozen end) reuse its
encodings.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional

import torch

from .conditions import condition_frames, condition_y, require_finite
from ..wanvideo.config import CLIP_DIM, CLIP_TOKENS
from .long_video import LongVideoPlan, Window
from .reference_schedule import ReferenceSchedule

COLOR_REFERENCES = ("source_frame_0", "window_reference")


@dataclass
class WindowCondition:
    y: torch.Tensor            # [1, 20, F_lat, h, w]
    clip_fea: torch.Tensor     # [1, 257, 1280]
    reference: torch.Tensor    # [H, W, 3] 0..1: the window's reference frame
    source_frame: int = 0


ConditionFn = Callable[[Window], WindowCondition]


def dubbing_conditions(schedule: ReferenceSchedule, frames: Mapping[int, torch.Tensor],
                       clip_frames: int, vae_encode: Callable[[torch.Tensor], torch.Tensor],
                       clip_encode: Optional[Callable[[torch.Tensor], torch.Tensor]],
                       clip_tokens: int = CLIP_TOKENS, clip_dim: int = CLIP_DIM, device=None,
                       known: Optional[WindowCondition] = None) -> ConditionFn:
    """Window -> its WindowCondition. `frames`: source index -> fitted uint8 [H, W, 3] for every
    index the schedule names; `vae_encode(pixels [F, H, W, 3] 0..1) -> normalised latents`;
    `clip_encode(frame [1, H, W, 3]) -> [1, 257, 1280]` or None for zero tokens. `device`: where
    the clip's pixels are assembled (the VAE's device: the grey frames are made there instead of
    crossing PCIe); `known`: a condition already encoded (the node's frame 0), reused."""
    missing = [i for i in schedule.needed() if i not in frames]
    if missing:
        raise ValueError(f"the schedule needs source frames {missing[:5]} that were not read")
    cache: dict[int, WindowCondition] = {} if known is None else {known.source_frame: known}

    def condition(window: Window) -> WindowCondition:
        index = schedule.frames[window.index]
        if index not in cache:
            cache.clear()      # keep one: windows visit a frame in one run (freeze) or once
            reference = frames[index].float() / 255
            pixels = condition_frames(reference.to(device) if device is not None else reference,
                                      int(clip_frames))
            y = condition_y(vae_encode(pixels).cpu())
            fea = clip_encode(reference[None]) if clip_encode is not None \
                else torch.zeros(1, clip_tokens, clip_dim)
            cache[index] = WindowCondition(y.float(), fea.float(), reference, index)
        return cache[index]

    return condition


def check_condition(cond: WindowCondition, window: Window, plan: LongVideoPlan,
                    want_y_shape: tuple) -> None:
    """A window's condition must match the first one's geometry and hold finite numbers."""
    where = f"window {window.index + 1}/{plan.num_windows} (source frame {cond.source_frame})"
    if tuple(cond.y.shape) != tuple(want_y_shape):
        raise ValueError(f"{where}: image condition {tuple(cond.y.shape)} differs from the first "
                         f"window's {tuple(want_y_shape)}")
    require_finite(cond.y, f"{where}: the image condition")
    require_finite(cond.clip_fea, f"{where}: the CLIP vision tokens")
