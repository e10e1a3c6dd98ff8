import pytest
import torch

from wanvideo_infinitetalk.multitalk import color


def _smooth_image(seed, frames, h=24, w=32, base=(0.5, 0.45, 0.4), spread=0.12):
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(frames, 3, 4, 4, generator=g) - 0.5
    up = torch.nn.functional.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    img = torch.tensor(base).view(1, 3, 1, 1) + spread * up / 0.5
    return img.permute(0, 2, 3, 1).clamp(0, 1).contiguous()


def test_lab_known_values_and_round_trip():
    # Values printed by skimage.color.rgb2lab (its matrix makes white's a/b slightly non-zero);
    # the full official routine was also compared against skimage once (max diff 5e-7, float32).
    rgb = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]],
                       dtype=torch.float64)
    lab = color.rgb_to_lab(rgb)
    want = torch.tensor([[100.0, -2.45494e-03, 4.65342e-03], [53.2408, 80.0925, 67.2032],
                         [32.29567, 79.18559, -107.85730], [0.0, 0.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(lab, want, atol=5e-4, rtol=0)
    img = torch.rand(5, 7, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(color.lab_to_rgb(color.rgb_to_lab(img)), img, atol=2e-5, rtol=0)


def test_strength_zero_is_identity():
    frames = _smooth_image(1, 3)
    ref = _smooth_image(2, 1)[0]
    assert color.match_colors(frames, ref, 0.0) is frames


def test_strength_one_matches_reference_lab_statistics():
    frames = _smooth_image(3, 4, base=(0.55, 0.5, 0.42), spread=0.1)
    ref = _smooth_image(4, 1, base=(0.45, 0.47, 0.52), spread=0.15)
    out = color.match_colors(frames, ref, 1.0, chunk=3)
    assert out.shape == frames.shape and out.dtype == frames.dtype
    ref_lab = color.rgb_to_lab(ref.double()).reshape(-1, 3)
    for f in range(out.shape[0]):
        lab = color.rgb_to_lab(out[f].double()).reshape(-1, 3)
        torch.testing.assert_close(lab.mean(0), ref_lab.mean(0), atol=2e-3, rtol=0)
        torch.testing.assert_close(lab.std(0, correction=0), ref_lab.std(0, correction=0), atol=2e-3, rtol=0)


def test_blend_is_linear_in_strength_and_per_frame():
    frames = _smooth_image(5, 2)
    ref = _smooth_image(6, 1)
    full = color.match_colors(frames, ref, 1.0)
    half = color.match_colors(frames, ref, 0.5)
    torch.testing.assert_close(half, 0.5 * frames + 0.5 * full, atol=1e-6, rtol=0)
    single = color.match_colors(frames[1:2], ref, 1.0)
    torch.testing.assert_close(single[0], full[1], atol=1e-6, rtol=0)


def test_flat_frame_takes_reference_mean_and_errors():
    flat = torch.full((1, 8, 8, 3), 0.3)
    ref = _smooth_image(7, 1)
    out = color.match_colors(flat, ref, 1.0)
    ref_mean = color.rgb_to_lab(ref.double()).reshape(-1, 3).mean(0)
    torch.testing.assert_close(color.rgb_to_lab(out[0, 0, 0].double()), ref_mean, atol=2e-3, rtol=0)
    with pytest.raises(ValueError):
        color.match_colors(flat, ref, 1.5)
    with pytest.raises(ValueError):
        color.match_colors(flat[0], ref, 0.5)
