"""GPU tests of the CUDA kernel reading V as it is (attention_int8_cuda_vdirect): with
attention_int8_cuda.V_DIRECT on, quantize_kv writes no V^T and the kernel's P.V reads V's own
tiles MN-major. The tensor cores see the same bf16 values in the same order either way, so the
output must equal the V^T kernel's bit for bit: keys not a multiple of 128 (TMA's zero fill past
the end), batch and heads, strided views of a packed QKV, both ring sizes, CTA pairs."""
from __future__ import annotations

import pytest
import torch

from test_attention_int8 import cuda_inputs, cuda_kernel_out, gpu_test


def _direct(q, k, v, stages=3, **options):
    """The kernel's output with V read directly (quantize_kv must hand V itself over)."""
    from wanvideo_infinitetalk.wanvideo import attention_int8 as ai
    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda as ac

    saved, ac.V_DIRECT = ac.V_DIRECT, True
    try:
        k_int, k_scale, v_given, k_bound = ai.quantize_for(k, v, ai.HOPPER_CUDA)
        assert v_given is v
        out = torch.full_like(q, float("nan"))
        ac.attention(q, k_int, k_scale, v, out, k.shape[1], ai.softmax_factor(q.shape[-1]),
                     stages, 0, k_bound=k_bound, **options)
    finally:
        ac.V_DIRECT = saved
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    return out


@gpu_test
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("multicast", [False, True], ids=["single", "pairs"])
@pytest.mark.parametrize("b,lq,lk,heads", [(2, 1500, 1300, 4), (1, 4097, 4097, 2),
                                           (1, 130, 2111, 2), (1, 300, 100, 2),
                                           (1, 8100, 8100, 2)])
def test_v_read_directly_gives_the_v_transposed_output_bit_for_bit(b, lq, lk, heads, stages,
                                                                   multicast):
    q, k, v = cuda_inputs(b, lq, lk, heads, 128, torch.bfloat16)
    expected = cuda_kernel_out(q, k, v, stages, multicast=multicast)
    assert torch.equal(_direct(q, k, v, stages, multicast=multicast), expected)


@gpu_test
def test_v_read_directly_from_a_packed_qkv_view():
    """V as the model's attention gets it: a view of [B, L, 3, H, D] (strides 3 * H * D apart
    between keys), with the static and the lazy loop."""
    q, k, v = cuda_inputs(2, 700, 900, 2, 128, torch.bfloat16, seed=3)
    packed = torch.stack([k, k, v], dim=2)   # [B, L, 3, H, D]
    view = packed[:, :, 2]
    assert not view.is_contiguous()
    for options in ({}, {"static_max": False}):
        assert torch.equal(_direct(q, k, view, **options), cuda_kernel_out(q, k, v, **options))


@gpu_test
def test_misaligned_v_gets_the_v_transposed_copy_and_the_launcher_refuses_it():
    """A V the tensor map cannot take (pointer 8 bytes off) makes quantize_kv write V^T as
    before (same output); handed to the launcher directly it is an error naming V."""
    from wanvideo_infinitetalk.wanvideo import attention_int8 as ai
    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda as ac

    q, k, v = cuda_inputs(1, 300, 500, 2, 128, torch.bfloat16, seed=4)
    flat = torch.empty(v.numel() + 4, dtype=v.dtype, device=v.device)
    odd = flat[4:].view(v.shape)
    odd.copy_(v)
    assert odd.data_ptr() % 16
    saved, ac.V_DIRECT = ac.V_DIRECT, True
    try:
        assert not ac.reads_v(odd) and ac.reads_v(v)
        k_int, k_scale, v_t, k_bound = ai.quantize_for(k, odd, ai.HOPPER_CUDA)
        assert v_t.shape == (2, 128, 512)
        out = torch.empty_like(q)
        with pytest.raises(ValueError, match="V must be"):
            ac.attention(q, k_int, k_scale, odd, out, 500, 1.0, k_bound=k_bound)
    finally:
        ac.V_DIRECT = saved
    assert torch.equal(cuda_kernel_out(q, k, odd), cuda_kernel_out(q, k, v))
