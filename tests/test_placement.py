"""The checker finds every kind of violation, and the guards fix exactly what needs fixing."""
import pytest
import torch
from torch import nn

from wanvideo_infinitetalk.wanvideo import placement
from test_layout_fuzz import offset_view


def test_checker_names_strided_misaligned_and_plain_attributes():
    m = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    m[0]._parameters["weight"] = nn.Parameter(torch.randn(8, 8).t(), requires_grad=False)
    m[1]._parameters["bias"] = nn.Parameter(offset_view(torch.randn(8), 4), requires_grad=False)
    m[1].cached = torch.ones(3)
    bad = placement.check_layout(m)
    assert "0.weight (non-contiguous)" in bad
    assert "1.bias (ptr%16=4)" in bad
    assert "1.cached (plain tensor attribute)" in bad
    with pytest.raises(placement.LayoutError, match="0.weight"):
        placement.verify(m, "test", force=True)
    del m[1].cached
    placement.move_module(m, "cpu")
    assert placement.check_layout(m) == []


def test_kernel_guards_copy_only_when_needed():
    ok = torch.randn(4, 8)
    assert placement.kernel_ready(ok) is ok
    shifted = offset_view(torch.randn(4, 8), 8)
    fixed = placement.kernel_ready(shifted)
    assert fixed.data_ptr() % 16 == 0 and torch.equal(fixed, shifted)
    # .contiguous() keeps a misaligned pointer: the trap the guard exists for
    assert shifted.contiguous().data_ptr() % 16 == 8
    qkv = torch.randn(1, 6, 2, 8).transpose(1, 2)  # [B,H,L,D] view of [B,L,H,D]: fine for SDPA
    assert placement.attention_ready(qkv) is qkv
    assert placement.attention_ready(offset_view(torch.randn(1, 2, 6, 8), 2)).data_ptr() % 16 == 0


def test_adopt_refuses_misaligned_storage():
    m = nn.Linear(4, 4)
    with pytest.raises(placement.LayoutError):
        placement.adopt_tensor(m, "weight", offset_view(torch.randn(4, 4), 8))


def test_pack_flat_subviews_are_aligned():
    ts = [torch.randn(3), torch.randn(5, 7).bfloat16(), torch.zeros(0), torch.randn(2, 2)]
    flat, spans = placement.pack_flat(ts, "cpu")
    for t, (off, _) in zip(ts, spans):
        v = placement.view_in(flat, off, t)
        assert torch.equal(v, t) and placement.is_ready(v)
