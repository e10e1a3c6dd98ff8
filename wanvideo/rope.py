"""3-axis rotary position embedding of Wan2.1 (frames, height, width): float64 angles, fp32 rotation."""
from __future__ import annotations

import torch

MAX_POSITIONS = 1024


def axis_split(head_dim: int) -> tuple[int, int, int]:
    """Channels per axis: 128 -> (44, 42, 42); height and width share what is left."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def angle_table(head_dim: int, theta: float = 10000.0, positions: int = MAX_POSITIONS) -> torch.Tensor:
    """[positions, head_dim/2] rotation angles, the three axes' tables side by side."""
    tables = []
    pos = torch.arange(positions, dtype=torch.float64)
    for width in axis_split(head_dim):
        inv = 1.0 / torch.pow(theta, torch.arange(0, width, 2, dtype=torch.float64) / width)
        tables.append(torch.outer(pos, inv))
    return torch.cat(tables, dim=1)


def grid_angles(table: torch.Tensor, grid: tuple[int, int, int], head_dim: int) -> torch.Tensor:
    """[F*H*W, head_dim/2] angles for a token grid (frame-major order, as the patchifier emits)."""
    f, h, w = grid
    cf, ch, cw = (c // 2 for c in axis_split(head_dim))
    tf, th, tw = table[:f, :cf], table[:h, cf:cf + ch], table[:w, cf + ch:cf + ch + cw]
    return torch.cat([
        tf[:, None, None, :].expand(f, h, w, cf),
        th[None, :, None, :].expand(f, h, w, ch),
        tw[None, None, :, :].expand(f, h, w, cw),
    ], dim=-1).reshape(f * h * w, -1)


def rotations(angles: torch.Tensor, device) -> torch.Tensor:
    """complex64 unit rotations [L, 1, D/2] from float64 angles, computed once per forward and
    shared by every block."""
    rot = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)
    return rot.to(device)[:, None, :]


def apply_rope(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent channel pairs of x [B, L, H, D] by `rot` (see rotations) in fp32: one
    complex multiply instead of a chain of real elementwise passes over the activations."""
    b, seq, heads, d = x.shape
    pairs = torch.view_as_complex(x.float().reshape(b, seq, heads, d // 2, 2))
    return torch.view_as_real(pairs * rot).reshape(b, seq, heads, d).to(x.dtype)


def cos_sin(rot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (cos, sin) [L, D/2] of `rotations` output: strided views of its real and imaginary
    parts (no copy), for the fused RMSNorm+RoPE kernel."""
    pairs = torch.view_as_real(rot)[:, 0]
    return pairs[..., 0], pairs[..., 1]
