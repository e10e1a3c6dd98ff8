"""GPU tests of the CUDA kernel's CTA pairs (attention_int8_cuda_cluster): two CTAs of
neighbouring query tiles share every K/V tile by TMA multicast. Only the loading changes, so the
output must equal the unpaired kernel's bit for bit, whatever the tile count (odd counts give the
last pair a CTA without query rows), the batch, the strides or the ring size; and the default
pairs CTAs exactly from attention_int8_cuda.MULTICAST_MIN_KEYS keys."""
from __future__ import annotations

import pytest
import torch

from test_attention_int8 import cuda_inputs, cuda_kernel_out, gpu_test


@gpu_test
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("b,lq,lk,heads", [(1, 300, 300, 2),      # 3 query tiles: odd
                                           (2, 1000, 1500, 4),    # 8 tiles, keys not x128
                                           (1, 130, 2111, 2),     # 2 tiles, 2 rows in one
                                           (1, 8100, 8100, 2),
                                           (1, 16500, 16500, 2)])
def test_paired_ctas_give_the_unpaired_output_bit_for_bit(b, lq, lk, heads, stages):
    q, k, v = cuda_inputs(b, lq, lk, heads, 128, torch.bfloat16)
    paired = cuda_kernel_out(q, k, v, stages, multicast=True)
    single = cuda_kernel_out(q, k, v, stages, multicast=False)
    assert torch.equal(paired, single)


@gpu_test
def test_paired_ctas_read_strided_queries_and_write_strided_outputs():
    """q as a view of a wider tensor (the multi-GPU all-to-all's stacked q/k/v) and out a view
    too: same bits as contiguous copies."""
    q, k, v = cuda_inputs(1, 777, 777, 4, 128, torch.bfloat16)
    wide = torch.zeros(1, 777, 4, 3, 128, dtype=q.dtype, device=q.device)
    wide[:, :, :, 1] = q
    out_wide = torch.full_like(wide, float("nan"))
    cuda_kernel_out(wide[:, :, :, 1], k, v, out=out_wide[:, :, :, 2], multicast=True)
    assert torch.equal(out_wide[:, :, :, 2], cuda_kernel_out(q, k, v, multicast=False))
    assert torch.isnan(out_wide[:, :, :, :2]).all()   # nothing written outside the view


@gpu_test
@pytest.mark.parametrize("threshold,paired", [(1200, True), (1201, False)])
def test_the_default_pairs_ctas_from_the_threshold(monkeypatch, threshold, paired):
    """The launcher's default follows MULTICAST_MIN_KEYS (1,200 keys here)."""
    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda as ac

    q, k, v = cuda_inputs(1, 600, 1200, 2, 128, torch.bfloat16)
    launched = []
    original = ac._kernel

    def spy(device_index, stages, diag, options):
        launched.append(dict(options))
        return original(device_index, stages, diag, options)

    monkeypatch.setattr(ac, "MULTICAST_MIN_KEYS", threshold)
    monkeypatch.setattr(ac, "_kernel", spy)
    out = cuda_kernel_out(q, k, v)
    assert [o["multicast"] for o in launched] == [paired]
    assert torch.equal(out, cuda_kernel_out(q, k, v, multicast=not paired))
