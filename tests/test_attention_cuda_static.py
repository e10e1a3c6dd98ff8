"""GPU tests of the CUDA kernel's static maximum (attention_int8_cuda_static): m fixed after the
first key block from the Cauchy-Schwarz bound on the scores, no per-block test. Each test first
checks, from the float inputs, which loop its warpgroups must take (the bound exceeds a row's
first-block maximum by far less or far more than STATIC_WINDOW = 96 log2 units), so both loops
and a CTA running one of each are exercised on purpose; the outputs are compared with the lazy
loop (static_max=False) and the max-first kernel, and with fp32 attention."""
from __future__ import annotations

import math

import pytest
import torch

from test_attention_8bit import errors
from test_attention_cuda_lazy import compare_variants
from test_attention_int8 import cuda_inputs, cuda_kernel_out, gpu_test

MAX_FIRST = {"lazy_max": False, "q_regs": False}   # the eighth session's kernel
WINDOW = 96.0


def _run(q, k, v, **options):
    return cuda_kernel_out(q, k, v, **options).float()


def _static_rows(q, k, v, **options):
    """[B, Lq, H] bool: whether the warpgroup of each query row took the static loop (the
    kernel's diag 6 writes 1 or 0 into every output element)."""
    from wanvideo_infinitetalk.wanvideo import attention_int8 as ai
    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda as ac

    k_int, k_scale, v_t, k_bound = ai.quantize_for(k, v, ai.HOPPER_CUDA)
    out = torch.full_like(q, float("nan"))
    ac.attention(q, k_int, k_scale, v_t, out, k.shape[1], ai.softmax_factor(q.shape[-1]), 3, 6,
                 k_bound=k_bound, **options)
    rows = out.float()
    assert ((rows == 0) | (rows == 1)).all()
    assert (rows == rows[..., :1]).all()   # one answer per row
    return rows[..., 0] == 1


def _gaps(q, k):
    """Per query row and head, in log2 units: the bound minus the first block's maximum, and
    the row's largest score minus that maximum (float inputs, K smoothed as the kernel does)."""
    scale = math.log2(math.e) / math.sqrt(q.shape[-1])
    kf = k.float()
    ks = kf - kf.mean(dim=1, keepdim=True)
    qf = q.float()
    bound = qf.norm(dim=-1) * ks.norm(dim=-1).amax(dim=1, keepdim=True) * scale
    first = torch.einsum("blhd,bjhd->blhj", qf, ks[:, :128]).amax(-1) * scale
    top = torch.einsum("blhd,bjhd->blhj", qf, ks).amax(-1) * scale
    return bound - first, top - first


def _aligned(a_first: float, a_second: float, b: float, lq: int = 600, lk: int = 2000,
             heads: int = 2):
    """Queries with a shared direction u, a_first of it in the first 64 rows of every 128-row
    tile (the first consumer warpgroup), a_second in the other 64; key 1,500 (block 11) has b
    of it, so its scores rise far above the first block's."""
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, n, heads, 128, device="cuda", generator=g) for n in (lq, lk, lk))
    u = torch.randn(128, device="cuda", generator=g)
    u /= u.norm()
    first_half = (torch.arange(lq, device="cuda") % 128) < 64
    a = torch.where(first_half, a_first, a_second)
    q = q + a[None, :, None, None] * u
    k[:, 1500] += b * u
    return tuple(t.bfloat16() for t in (q, k, v)), first_half


@gpu_test
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("b,lq,lk,heads", [(2, 1500, 1300, 4), (1, 4097, 4097, 2),
                                           (1, 130, 2111, 2), (1, 8100, 8100, 2),
                                           (1, 300, 100, 2)])
def test_static_loop_is_as_accurate_as_the_lazy_loop(b, lq, lk, heads, stages):
    """DiT-like inputs (K bias, outlier channels): every warpgroup takes the static loop; P
    differs from the lazy loop's by a power of two per row before bf16 rounding, so the outputs
    differ by bf16 noise and the error against fp32 stays the same."""
    q, k, v = cuda_inputs(b, lq, lk, heads, 128, torch.bfloat16)
    gap, _ = _gaps(q, k)
    assert gap.max() < WINDOW - 16, gap.max()
    assert _static_rows(q, k, v).all()
    rel, ours_err, lazy_err = compare_variants(
        q, k, v, {"stages": stages}, {"stages": stages, "static_max": False},
        f"static vs lazy {b, lq, lk, heads} stages {stages}")
    assert rel <= 6e-3
    assert ours_err <= lazy_err * 1.03 + 1e-4


@gpu_test
@pytest.mark.parametrize("a_first,a_second,b,loops", [
    (16.0, 16.0, 16.0, "static"),        # later scores 2^30 above block 0's: P >> 1, no rescale
    (40.0, 40.0, 40.0, "lazy"),          # bound far above: the lazy loop, exp2 rescued
    (12.0, 60.0, 30.0, "one of each")])  # first warpgroup static, second lazy, in every CTA
@pytest.mark.parametrize("multicast", [False, True], ids=["single", "pairs"])
def test_rising_scores_take_the_loop_the_bound_allows(a_first, a_second, b, loops, multicast):
    """A key far more aligned with the queries than any in block 0. Where the bound is within
    the window the static loop runs with P up to 2^64 (no overflow by construction); beyond it
    the warpgroup falls back to the lazy loop (rescaling, and recomputing the scores past
    exp2's range). Either way the output follows the max-first kernel and stays finite."""
    (q, k, v), first_half = _aligned(a_first, a_second, b)
    gap, rise = _gaps(q, k)
    first, second = gap[:, first_half], gap[:, ~first_half]
    static = _static_rows(q, k, v, multicast=multicast)
    if loops == "static":
        assert gap.max() < WINDOW - 16 and rise.max() > 16, (gap.max(), rise.max())
        assert static.all()
    elif loops == "lazy":
        assert gap.min() > WINDOW + 16 and rise.max() > 128, (gap.min(), rise.max())
        assert not static.any()
    else:
        assert first.max() < WINDOW - 16 and second.min() > WINDOW + 16, (first.max(),
                                                                           second.min())
        assert static[:, first_half].all() and not static[:, ~first_half].any()
    ours = _run(q, k, v, multicast=multicast)
    theirs = _run(q, k, v, **MAX_FIRST)
    rel, _ = errors(ours.cpu(), theirs.cpu())
    print(f"\n{loops}: static kernel vs max-first: {rel:.2e}")
    assert rel <= 3e-3


@gpu_test
def test_a_query_of_zeros_attends_uniformly_in_the_static_loop():
    """A zero query row: bound 0, every score 0, P uniform: the output is the mean of V."""
    q, k, v = cuda_inputs(1, 700, 900, 2, 128, torch.bfloat16)
    q[:, 5] = 0
    assert _static_rows(q, k, v)[:, 5].all()
    out = _run(q, k, v)
    rel, _ = errors(out[:, 5].cpu(), v.float().mean(dim=1).cpu())
    assert rel <= 2e-2


@gpu_test
@pytest.mark.parametrize("multicast", [False, True], ids=["single", "pairs"])
def test_turns_between_the_warpgroups_change_no_bit(multicast):
    """`pingpong` only orders when each consumer warpgroup issues its products (named
    barriers); the arithmetic is the same, so the output is bit for bit the same."""
    q, k, v = cuda_inputs(1, 1500, 4100, 2, 128, torch.bfloat16)
    turns = _run(q, k, v, multicast=multicast, pingpong=True)
    free = _run(q, k, v, multicast=multicast, pingpong=False)
    assert torch.equal(turns, free)


@gpu_test
@pytest.mark.parametrize("options", [{}, {"multicast": True}, {"static_max": False}],
                         ids=["static", "pairs", "lazy"])
def test_preset_from_shared_memory_changes_no_bit(options):
    """`preset_lds` loads the scores' start value instead of moving it into the registers: the
    same bits, so the same output."""
    q, k, v = cuda_inputs(1, 1500, 4100, 2, 128, torch.bfloat16)
    assert torch.equal(_run(q, k, v, preset_lds=True, **options), _run(q, k, v, **options))

