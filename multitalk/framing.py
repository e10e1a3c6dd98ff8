"""How the portrait becomes the output frame: scale to cover width x height, then centre-crop.

Everything drawn on the portrait (speaker masks, boxes, default halves) goes through exactly the
same geometry, so a mask painted on a square portrait still covers the same face in a 832x480
video (stretching the mask instead moved it by up to a quarter of the frame).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CoverCrop:
    """Scaled size of the source and the crop window inside it."""
    scaled_h: int
    scaled_w: int
    top: int
    left: int
    height: int
    width: int


def cover_crop(src_h: int, src_w: int, width: int, height: int) -> CoverCrop:
    if min(src_h, src_w, width, height) < 1:
        raise ValueError(f"cannot fit a {src_w}x{src_h} image into {width}x{height}")
    scale = max(width / src_w, height / src_h)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    return CoverCrop(new_h, new_w, (new_h - height) // 2, (new_w - width) // 2, height, width)


def _apply(x: torch.Tensor, g: CoverCrop) -> torch.Tensor:
    """x [N, C, H, W] float -> scaled (bicubic, antialiased) and cropped to g's window."""
    if (g.scaled_h, g.scaled_w) != tuple(x.shape[-2:]):
        x = F.interpolate(x, size=(g.scaled_h, g.scaled_w), mode="bicubic", align_corners=False,
                          antialias=True)
    return x[:, :, g.top:g.top + g.height, g.left:g.left + g.width]


def fit_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, C] (or [1, H, W, C]) 0..1 -> [height, width, 3]: scale to cover, centre-crop."""
    img = image[0] if image.ndim == 4 else image
    img = img[..., :3].float()
    g = cover_crop(int(img.shape[0]), int(img.shape[1]), int(width), int(height))
    x = _apply(img.permute(2, 0, 1).unsqueeze(0), g)
    return x[0].permute(1, 2, 0).clamp(0.0, 1.0).contiguous()


def fit_masks(masks: torch.Tensor, src_h: int, src_w: int, width: int, height: int) -> torch.Tensor:
    """Masks drawn over a src_w x src_h portrait ([N, h, w] at any resolution: they span the whole
    portrait) -> [N, height, width] 0/1, through the portrait's own scale and crop."""
    if masks.ndim != 3:
        raise ValueError(f"masks must be [N, H, W], got {tuple(masks.shape)}")
    g = cover_crop(int(src_h), int(src_w), int(width), int(height))
    m = masks.float().unsqueeze(1)
    if tuple(m.shape[-2:]) != (int(src_h), int(src_w)):
        m = F.interpolate(m, size=(int(src_h), int(src_w)), mode="nearest")
    out = _apply(m, g)
    return (out[:, 0] > 0.5).float().contiguous()
