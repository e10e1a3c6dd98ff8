"""attention_lse / merge_partial (the key exchange of sequence parallelism): attention over key
blocks computed apart and merged equals attention over all keys; the log-sum-exp is the natural
log of the softmax normaliser; on CUDA the cuDNN path against the fp32 math."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton_interpreter

from wanvideo_infinitetalk.wanvideo.attention import attention_lse, merge_partial


def _inputs(lq=37, lk=53, h=3, d=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(lq * lk)
    q, k, v = (torch.randn(2, n, h, d, generator=g) for n in (lq, lk, lk))
    k = k + 3 * torch.randn(1, 1, h, d, generator=g)   # a shared bias, as real keys have
    return tuple(t.to(device, dtype) for t in (q, k, v))


def _reference(q, k, v):
    qt, kt, vt = (t.double().transpose(1, 2) for t in (q, k, v))
    s = qt @ kt.transpose(-1, -2) / q.shape[-1] ** 0.5
    return (torch.softmax(s, -1) @ vt).transpose(1, 2), torch.logsumexp(s, -1)


def test_lse_and_output_match_the_math():
    q, k, v = _inputs()
    out, lse = attention_lse(q, k, v)
    want, want_lse = _reference(q, k, v)
    assert out.shape == q.shape and lse.shape == (2, 3, 37) and lse.dtype == torch.float32
    assert torch.allclose(out.double(), want, atol=1e-5)
    assert torch.allclose(lse.double(), want_lse, atol=1e-5)


@pytest.mark.parametrize("cuts", [(20,), (1, 30), (10, 11, 40)])
def test_merged_blocks_equal_attention_over_all_keys(cuts):
    q, k, v = _inputs()
    bounds = [0, *cuts, k.shape[1]]
    out = lse = None
    for a, b in zip(bounds, bounds[1:]):
        part = attention_lse(q, k[:, a:b], v[:, a:b])
        out, lse = part if out is None else merge_partial(out, lse, *part)
    want, want_lse = _reference(q, k, v)
    assert torch.allclose(out.double(), want, atol=1e-5)
    assert torch.allclose(lse.double(), want_lse, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("lq,lk", [(300, 517), (1560, 4680)])
def test_cuda_lse_matches_the_math(lq, lk):
    q, k, v = _inputs(lq, lk, 4, 128, torch.bfloat16, "cuda")
    out, lse = attention_lse(q, k, v)
    want, want_lse = _reference(q, k, v)
    assert (lse.double() - want_lse).abs().max() < 2e-2
    assert (out.double() - want).norm() / want.norm() < 1e-2
    sdpa = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert (out.double() - sdpa.double()).norm() / sdpa.double().norm() < 1e-2
    # two halves merged give the whole, within bf16 noise
    half = lk // 2
    merged, _ = merge_partial(*attention_lse(q, k[:, :half], v[:, :half]),
                              *attention_lse(q, k[:, half:], v[:, half:]))
    assert (merged.double() - want).norm() / want.norm() < 1e-2


def _triton_merge_matches_torch(device, dtype):
    from wanvideo_infinitetalk.wanvideo import attention as att

    q, k, v = _inputs(45, 70, 5, 32, dtype, device)
    a = att.attention_lse(q, k[:, :33], v[:, :33])
    b = att.attention_lse(q, k[:, 33:], v[:, 33:])
    want = att.merge_partial(*(t.cpu() for t in a), *(t.cpu() for t in b))
    got = att._merge_triton(*a, *b)
    assert got[0].dtype == dtype and got[0].shape == q.shape and got[1].shape == (2, 5, 45)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got[0].cpu().float(), want[0].float(), atol=tol), device
    assert torch.allclose(got[1].cpu(), want[1], atol=1e-5), device


def test_merge_kernel_under_triton_interpreter():
    """The Triton merge's indexing on CPU tensors (TRITON_INTERPRET=1, fresh process)."""
    triton_interpreter.run("import test_attention_lse as t\n"
                           "t._triton_merge_matches_torch('cpu', torch.float32)\n")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_merge_kernel_matches_torch_on_cuda(dtype):
    _triton_merge_matches_torch("cuda", dtype)
