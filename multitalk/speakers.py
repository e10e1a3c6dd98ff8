"""Two-speaker audio tracks and speaker masks.

Audio modes (after each track is prepared: mono 16 kHz, -23 LUFS):
  "para": both speak at the same time; the shorter track is padded with silence to the longer.
  "add":  speaker 1 speaks, then speaker 2: track 1 = a1 + silence(len a2), track 2 = silence(len a1) + a2.
Masks are [2, H, W] at any resolution (1 = the speaker's region); AudioProjModel.make_context
resizes them (nearest) to the token grid. Boxes are (left, top, right, bottom) in pixels of the
reference image, or fractions of its size when every value is <= 1.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

MODES = ("para", "add")
DEFAULT_INSET = 0.05


def combine_tracks(tracks: Sequence[np.ndarray], mode: str = "para") -> list[np.ndarray]:
    """One or two prepared 16 kHz tracks -> the per-speaker tracks the features are taken from."""
    if mode not in MODES:
        raise ValueError(f"two-speaker audio mode must be one of {MODES}, got {mode!r}")
    tracks = [t for t in tracks if t is not None]
    if len(tracks) == 1:
        return [np.asarray(tracks[0], dtype=np.float32)]
    if len(tracks) != 2:
        raise ValueError(f"InfiniteTalk handles one or two speakers, got {len(tracks)} audio tracks")
    a1, a2 = (np.asarray(t, dtype=np.float32) for t in tracks)
    if mode == "add":
        return [np.concatenate([a1, np.zeros_like(a2)]), np.concatenate([np.zeros_like(a1), a2])]
    n = max(a1.shape[0], a2.shape[0])
    return [np.pad(a1, (0, n - a1.shape[0])), np.pad(a2, (0, n - a2.shape[0]))]


def require_tracks(n_tracks: int, n_speakers: int) -> None:
    if n_speakers == 2 and n_tracks < 2:
        raise ValueError("two-speaker mode needs two audio inputs (one per speaker); got "
                         f"{n_tracks}. Connect the second speaker's audio or use one speaker.")
    if n_speakers not in (1, 2):
        raise ValueError(f"InfiniteTalk handles one or two speakers, got {n_speakers}")


def default_masks(height: int, width: int, inset: float = DEFAULT_INSET) -> torch.Tensor:
    """Left and right halves, each inset by `inset` of its size (the official default layout)."""
    m = torch.zeros(2, height, width)
    top, bottom = int(height * inset), int(height * (1 - inset))
    half = width // 2
    for i, x0 in enumerate((0, half)):
        m[i, top:bottom, x0 + int(half * inset):x0 + int(half * (1 - inset))] = 1
    return m


def box_masks(height: int, width: int, boxes: Sequence[Sequence[float]]) -> torch.Tensor:
    if len(boxes) != 2:
        raise ValueError(f"two speakers need 2 bounding boxes, got {len(boxes)}")
    m = torch.zeros(2, height, width)
    for i, box in enumerate(boxes):
        if len(box) != 4:
            raise ValueError(f"bounding box {i + 1} must be (left, top, right, bottom), got {box}")
        left, top, right, bottom = (float(v) for v in box)
        if max(abs(left), abs(top), abs(right), abs(bottom)) <= 1.0:
            left, right, top, bottom = left * width, right * width, top * height, bottom * height
        l, r = max(0, int(left)), min(width, int(right))
        t, b = max(0, int(top)), min(height, int(bottom))
        if r <= l or b <= t:
            raise ValueError(f"bounding box {i + 1} {tuple(box)} is empty inside a {width}x{height} image")
        m[i, t:b, l:r] = 1
    return m


def given_masks(masks: torch.Tensor | Sequence[torch.Tensor], height: int | None = None,
                width: int | None = None) -> torch.Tensor:
    """User masks ([2, H, W], a list of two [H, W], or ComfyUI MASK [2, H, W]) -> [2, H, W] 0/1,
    resized to (height, width) when given."""
    if not isinstance(masks, torch.Tensor):
        masks = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m in masks])
    if masks.dim() == 2:
        masks = masks[None]
    if masks.dim() != 3 or masks.shape[0] != 2:
        raise ValueError(f"two speakers need 2 masks, got {masks.shape[0] if masks.dim() == 3 else 1} "
                         f"(shape {tuple(masks.shape)})")
    masks = masks.float()
    if height is not None and width is not None and tuple(masks.shape[1:]) != (height, width):
        masks = F.interpolate(masks[None], size=(height, width), mode="nearest")[0]
    return (masks > 0.5).float()


def speaker_masks(n_speakers: int, height: int, width: int, boxes=None, masks=None,
                  inset: float = DEFAULT_INSET) -> torch.Tensor | None:
    """None for one speaker (the whole frame); [2, height, width] for two, from `masks`, else
    `boxes`, else the default halves."""
    if n_speakers == 1:
        return None
    if n_speakers != 2:
        raise ValueError(f"InfiniteTalk handles one or two speakers, got {n_speakers}")
    if masks is not None:
        return given_masks(masks, height, width)
    if boxes is not None:
        return box_masks(height, width, boxes)
    return default_masks(height, width, inset)
