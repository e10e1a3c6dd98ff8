"""Speaker masks follow the portrait's cover-and-crop (multitalk.framing), checked at the
resolution the model sees them: one mask value per latent token (16x16 pixels)."""
from __future__ import annotations

import pytest
import torch

from wanvideo_infinitetalk.multitalk.audio_proj import token_masks
from wanvideo_infinitetalk.multitalk.framing import cover_crop, fit_image, fit_masks
from wanvideo_infinitetalk.multitalk.speakers import box_masks

BOXES = [(0.10, 0.20, 0.45, 0.80), (0.55, 0.15, 0.90, 0.85)]
PORTRAITS = {"1:1": (512, 512), "4:3": (480, 640), "9:16": (512, 288)}   # (height, width)
OUTPUTS = {"832x480": (480, 832), "480x832": (832, 480)}


def expected_token_masks(src_h, src_w, height, width) -> torch.Tensor:
    """Independent geometry: each box's pixel edges mapped through the scale and crop, then
    sampled where the model's nearest resize samples (the first pixel of every 16x16 token)."""
    g = cover_crop(src_h, src_w, width, height)
    sy, sx = g.scaled_h / src_h, g.scaled_w / src_w
    ys = torch.arange(0, height, 16).float() + 0.5
    xs = torch.arange(0, width, 16).float() + 0.5
    out = []
    for left, top, right, bottom in BOXES:
        x0, x1 = int(left * src_w) * sx - g.left, int(right * src_w) * sx - g.left
        y0, y1 = int(top * src_h) * sy - g.top, int(bottom * src_h) * sy - g.top
        inside = ((ys >= y0) & (ys < y1))[:, None] & ((xs >= x0) & (xs < x1))[None, :]
        out.append(inside.flatten().float())
    return torch.stack(out)


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a > 0.5, b > 0.5
    return float((a & b).sum()) / max(1, float((a | b).sum()))


@pytest.mark.parametrize("portrait", PORTRAITS)
@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("mask_scale", [1.0, 0.5])
def test_masks_land_on_the_tokens_of_the_cropped_portrait(portrait, output, mask_scale):
    src_h, src_w = PORTRAITS[portrait]
    height, width = OUTPUTS[output]
    # Masks as a user paints them on the portrait (or at another resolution of it).
    drawn = box_masks(int(src_h * mask_scale), int(src_w * mask_scale), BOXES)
    framed = fit_masks(drawn, src_h, src_w, width, height)
    assert framed.shape == (2, height, width)
    got = token_masks(framed, height // 16, width // 16)[:2]
    want = expected_token_masks(src_h, src_w, height, width)
    scores = [iou(got[i], want[i]) for i in range(2)]
    print(f"{portrait} -> {output} (mask x{mask_scale}): IoU {scores}")
    assert min(scores) >= 0.98, scores


@pytest.mark.parametrize("portrait", ["1:1", "4:3"])
def test_stretching_the_masks_instead_would_miss_the_faces(portrait):
    """The check above can fail: the old behaviour (masks stretched to the frame) scores low."""
    src_h, src_w = PORTRAITS[portrait]
    stretched = token_masks(box_masks(src_h, src_w, BOXES), 30, 52)[:2]
    want = expected_token_masks(src_h, src_w, 480, 832)
    assert min(iou(stretched[i], want[i]) for i in range(2)) < 0.9


def test_fit_masks_matches_fit_image_on_the_same_picture():
    """A mask is cropped exactly like the portrait pixels it was drawn on."""
    g = torch.Generator().manual_seed(0)
    picture = (torch.rand(90, 120, generator=g) > 0.5).float()
    as_image = fit_image(picture[..., None].expand(-1, -1, 3), 64, 48)[..., 0] > 0.5
    as_mask = fit_masks(picture[None], 90, 120, 64, 48)[0] > 0.5
    assert (as_image == as_mask).float().mean() == 1.0


def test_fit_masks_refuses_bad_shapes():
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        fit_masks(torch.ones(4, 4), 4, 4, 16, 16)
    with pytest.raises(ValueError, match="cannot fit"):
        fit_masks(torch.ones(1, 4, 4), 0, 4, 16, 16)
