"""Colour correction of decoded frames towards the reference image (against long-video drift).

The official InfiniteTalk step (`match_and_blend_colors`): per frame, convert to CIE Lab
(skimage's rgb2lab: sRGB, D65, 2-degree observer), move each Lab channel's mean and standard
deviation onto the reference image's (Reinhard transfer: (x - mean_src) * std_ref / std_src +
mean_ref; a flat source channel becomes mean_ref), convert back, clip to [0, 1] and blend in RGB:
(1 - strength) * frame + strength * corrected. This is the same mean/std matching written in torch,
with the colour conversions reimplemented to match skimage (no skimage dependency).
Frames are processed a few at a time so an 81-frame 720p window does not multiply its memory.
"""
from __future__ import annotations

import torch

# sRGB (linear) -> CIE XYZ, D65; skimage's xyz_from_rgb.
_XYZ_FROM_RGB = (
    (0.412453, 0.357580, 0.180423),
    (0.212671, 0.715160, 0.072169),
    (0.019334, 0.119193, 0.950227),
)
_WHITE_D65 = (0.95047, 1.0, 1.08883)


def _matrices(device, dtype):
    m = torch.tensor(_XYZ_FROM_RGB, dtype=torch.float64)
    inv = torch.linalg.inv(m)
    return m.to(device, dtype), inv.to(device, dtype)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """[..., 3] sRGB in 0..1 -> Lab (L 0..100)."""
    xyz_from_rgb, _ = _matrices(rgb.device, rgb.dtype)
    lin = torch.where(rgb > 0.04045, ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4, rgb / 12.92)
    xyz = lin @ xyz_from_rgb.T
    xyz = xyz / torch.tensor(_WHITE_D65, device=rgb.device, dtype=rgb.dtype)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0.008856) ** (1.0 / 3.0), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f.unbind(-1)
    return torch.stack((116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)), dim=-1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Lab -> [..., 3] sRGB clipped to 0..1 (skimage's lab2rgb, including its z >= 0 clamp)."""
    _, rgb_from_xyz = _matrices(lab.device, lab.dtype)
    L, a, b = lab.unbind(-1)
    fy = (L + 16.0) / 116.0
    fx = a / 500.0 + fy
    fz = (fy - b / 200.0).clamp_min(0.0)
    f = torch.stack((fx, fy, fz), dim=-1)
    xyz = torch.where(f > 0.2068966, f ** 3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * torch.tensor(_WHITE_D65, device=lab.device, dtype=lab.dtype)
    lin = xyz @ rgb_from_xyz.T
    rgb = torch.where(lin > 0.0031308, 1.055 * lin.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055, 12.92 * lin)
    return rgb.clamp(0.0, 1.0)


def _mean_std(lab: torch.Tensor):
    """Per-image, per-channel mean and population std over H, W: [F, H, W, 3] -> [F, 1, 1, 3]."""
    flat = lab.double().flatten(1, 2)
    mean = flat.mean(dim=1)
    std = flat.std(dim=1, correction=0)
    return mean[:, None, None, :], std[:, None, None, :]


def match_colors(frames: torch.Tensor, reference: torch.Tensor, strength: float,
                 chunk: int = 8) -> torch.Tensor:
    """Colour-correct frames [F, H, W, 3] (0..1) towards reference [H, W, 3] or [1, H, W, 3].

    strength 0 returns `frames` itself; strength 1 is the full Lab mean/std transfer.
    The result has the dtype and device of `frames`; the math runs in float32.
    """
    strength = float(strength)
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"colour correction strength must be in [0, 1], got {strength}")
    if strength == 0.0:
        return frames
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [F, H, W, 3], got {tuple(frames.shape)}")
    ref = reference if reference.ndim == 4 else reference.unsqueeze(0)
    if ref.ndim != 4 or ref.shape[0] != 1 or ref.shape[-1] != 3:
        raise ValueError(f"reference must be [H, W, 3] or [1, H, W, 3], got {tuple(reference.shape)}")

    ref_lab = rgb_to_lab(ref.to(frames.device, torch.float32).clamp(0.0, 1.0))
    ref_mean, ref_std = _mean_std(ref_lab)
    out = torch.empty_like(frames)
    for start in range(0, frames.shape[0], max(1, int(chunk))):
        src = frames[start:start + chunk].float().clamp(0.0, 1.0)
        lab = rgb_to_lab(src)
        mean, std = _mean_std(lab)
        flat = std == 0
        scale = torch.where(flat, torch.zeros_like(std), ref_std / torch.where(flat, torch.ones_like(std), std))
        moved = (lab.double() - mean) * scale + ref_mean   # flat channel -> exactly mean_ref
        corrected = lab_to_rgb(moved.float())
        out[start:start + chunk] = ((1.0 - strength) * src + strength * corrected).to(frames.dtype)
    return out
