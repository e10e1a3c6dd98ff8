"""The torch emulation of the planned 8-bit attention kernel (wanvideo/attention_8bit.py) on CPU:
the exact identities it relies on, partial blocks, and its accuracy against fp32 SDPA on inputs
shaped like video DiT attention. Run with -s to see the measured errors."""
import functools

import pytest
import torch
import torch.nn.functional as F

from wanvideo_infinitetalk.wanvideo import attention_8bit as a8

HEADS = 2
# Accuracy targets from the issue; asserted bounds are never looser than these.
REL_L2_TARGET, COSINE_TARGET = 0.03, 0.999


def dit_like(tokens: int, head_dim: int, seed: int = 0):
    """q, k, v ~ N(0, 1) per element; K carries a large shared per-channel bias (about +8, a
    different value per channel and head) and 4 outlier channels whose bias is 10-20x larger,
    the pattern that makes K smoothing worthwhile in video DiTs."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, HEADS, tokens, head_dim, generator=g) for _ in range(3))
    bias = 8 + 2 * torch.randn(1, HEADS, 1, head_dim, generator=g)
    gain = torch.ones(1, HEADS, 1, head_dim)
    outliers = torch.randperm(head_dim, generator=g)[:4]
    gain[..., outliers] = 10 + 10 * torch.rand(1, HEADS, 1, 4, generator=g)
    return q, k + bias * gain, v


def errors(out: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(relative L2 error, cosine similarity) of the flattened tensors, in float64."""
    out, ref = out.flatten().double(), ref.flatten().double()
    rel = ((out - ref).norm() / ref.norm()).item()
    return rel, F.cosine_similarity(out, ref, dim=0).item()


@functools.lru_cache(maxsize=None)
def measured(tokens: int, head_dim: int, smooth: bool = True) -> dict:
    """Errors of the full emulation and of its two halves alone: INT8 Q.K^T (dequantized scores,
    fp32 P.V) and FP8 P.V (fp32 scores). Cached: several tests read the same case."""
    q, k, v = dit_like(tokens, head_dim)
    ref = F.scaled_dot_product_attention(q, k, v)
    result = {"full": errors(a8.attention_8bit(q, k, v, smooth=smooth), ref)}
    if smooth:
        qi, qs = a8.quantize_int8_blocks(q, a8.BLOCK_Q)
        ki, ks = a8.quantize_int8_blocks(a8.smooth_keys(k, tokens), a8.BLOCK_K)
        result["int8_qk"] = errors(F.scaled_dot_product_attention(
            (qi * qs).float(), (ki * ks).float(), v), ref)
        if tokens <= 4096:  # the split is the same at 8100 (measured); that case costs the most
            result["fp8_pv"] = errors(_fp8_pv_only(q, k, v), ref)
    print(f"\n{tokens} tokens, head_dim {head_dim}, smooth={smooth}: " + ", ".join(
        f"{name} rel L2 {rel:.4f} cos {cos:.6f}" for name, (rel, cos) in result.items()))
    return result


def _fp8_pv_only(q, k, v):
    """Exact fp32 scores, then the emulation's fp8 P (scale 448) and per-channel fp8 V."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    v8, v_scale = a8.quantize_v(v, v.shape[-2])
    acc, total = a8._direct_rows(scores, v8, "quantized")
    return acc * v_scale / total


# ----------------------------------------------------------------------------- exact identities

def test_smoothing_leaves_softmax_unchanged_exactly():
    """Subtracting K's mean shifts row i of Q K^T by the constant q_i . mean(k); softmax of a row
    is invariant to a constant shift, so the probabilities agree to fp64 rounding."""
    q, k, _ = (t.double() for t in dit_like(300, 128, seed=1))
    mean = k.mean(dim=-2, keepdim=True)
    scores, smoothed = q @ k.transpose(-2, -1), q @ (k - mean).transpose(-2, -1)
    shift = scores - smoothed
    per_query = (q @ mean.transpose(-2, -1)).expand_as(shift)
    assert torch.allclose(shift, per_query, rtol=1e-12, atol=1e-9)
    diff = (torch.softmax(scores / 128 ** 0.5, -1) - torch.softmax(smoothed / 128 ** 0.5, -1))
    assert diff.abs().max().item() <= 1e-12


def test_integer_scores_are_exact():
    """The float64 product of the int8 values equals int64 accumulation (the kernel's int32)."""
    q, k, _ = dit_like(200, 128, seed=2)
    qi, _ = a8.quantize_int8_blocks(q, a8.BLOCK_Q)
    ki, _ = a8.quantize_int8_blocks(a8.smooth_keys(k, 200), a8.BLOCK_K)
    assert qi.abs().max() <= 127 and torch.equal(qi, qi.round())
    exact = qi.long() @ ki.long().transpose(-2, -1)
    assert torch.equal((qi @ ki.transpose(-2, -1)).long(), exact)


def test_block_scales_of_partial_blocks_match_a_plain_loop():
    x = torch.randn(1, HEADS, 1000, 64)
    for block in (64, 128):
        per_token = a8.block_scales(x, block)
        for start in range(0, 1000, block):  # the last block holds 1000 % block tokens
            expected = x[..., start:start + block, :].abs().amax(dim=(-2, -1)) / 127
            assert torch.equal(per_token[..., start:start + block, 0],
                               expected[..., None].expand(-1, -1, min(block, 1000 - start)))


@pytest.mark.parametrize("online", [False, True])
def test_token_count_off_the_blocks_equals_padded_version(online):
    """1000 tokens (not a multiple of 64 or 128) against the same inputs padded to 1024 with
    zero queries and junk keys/values that `valid_keys` masks: the junk must not reach the mean,
    the scales or the softmax, and the partial tiles must quantize like masked full tiles."""
    q, k, v = dit_like(1000, 128, seed=3)
    g = torch.Generator().manual_seed(4)
    junk = 1000 * torch.randn(1, HEADS, 24, 128, generator=g)
    q_pad = torch.cat([q, torch.zeros(1, HEADS, 24, 128)], dim=-2)
    k_pad, v_pad = torch.cat([k, junk], dim=-2), torch.cat([v, -junk], dim=-2)
    out = a8.attention_8bit(q, k, v, online=online)
    padded = a8.attention_8bit(q_pad, k_pad, v_pad, online=online, valid_keys=1000)[..., :1000, :]
    assert torch.allclose(out, padded, rtol=1e-5, atol=1e-6)


def test_online_loop_agrees_with_direct_softmax():
    """The kernel's block-online loop quantizes a block seen before the row max as
    fp8(448 * exp(s - m_old)), a different rounding grid than the direct version's, so the two
    differ by about one fp8 rounding (measured 0.023 rel L2), not by fp32 rounding; neither is
    biased: both land equally close to fp32."""
    q, k, v = dit_like(1000, 128, seed=5)
    ref = F.scaled_dot_product_attention(q, k, v)
    direct = a8.attention_8bit(q, k, v)
    online = a8.attention_8bit(q, k, v, online=True)
    drift, drift_cos = errors(online, direct)
    rel, _ = errors(direct, ref)
    online_rel, online_cos = errors(online, ref)
    print(f"\nonline vs direct rel L2 {drift:.4f}; vs fp32: direct {rel:.4f}, "
          f"online {online_rel:.4f} cos {online_cos:.6f}")
    assert drift < rel and drift_cos > 0.999
    assert abs(online_rel - rel) < 0.1 * rel and online_cos >= COSINE_TARGET


def test_quantized_row_sum_keeps_output_a_weighted_average():
    """Why the row sum adds the quantized probabilities: with constant V the output is exactly
    that constant (fp8 of it), whatever fp8 does to P; the fp32 sum breaks this."""
    q, k, _ = dit_like(500, 64, seed=6)
    v = torch.full((1, HEADS, 500, 64), 0.75)  # exactly representable in e4m3
    assert torch.allclose(a8.attention_8bit(q, k, v), v, rtol=1e-6, atol=0)
    exact_sum = a8.attention_8bit(q, k, v, row_sum="exact")
    assert (exact_sum - v).abs().max().item() > 1e-6


def test_rejects_unsupported_shapes():
    with pytest.raises(ValueError, match="head_dim"):
        a8.attention_8bit(*(torch.randn(1, 1, 10, 96) for _ in range(3)))
    with pytest.raises(ValueError, match="valid_keys"):
        a8.attention_8bit(*(torch.randn(1, 1, 10, 64) for _ in range(3)), valid_keys=11)


# ----------------------------------------------------------------------------- accuracy study

CASES = [(4096, 128), (8100, 128), (4096, 64), (1000, 128)]


@pytest.mark.parametrize("tokens,head_dim", CASES)
def test_accuracy_against_fp32_sdpa(tokens, head_dim):
    found = measured(tokens, head_dim)
    _, cos = found["full"]
    assert cos >= COSINE_TARGET
    qk_rel, qk_cos = found["int8_qk"]
    # The INT8 half meets the targets with margin (measured 0.013 / 0.99991 in every case); the
    # full rel L2 (0.039) misses 0.03 because of the fp8 half: see the xfail test below.
    assert qk_rel <= 0.02 and qk_cos >= 0.9998


def test_smoothing_is_what_makes_the_biased_keys_accurate():
    smoothed, _ = measured(4096, 128)["full"]
    raw, raw_cos = measured(4096, 128, smooth=False)["full"]
    assert raw > 5 * smoothed and raw > 0.2 and raw_cos < 0.99


@pytest.mark.xfail(strict=True, reason="fp8 e4m3 P and V alone cost ~0.037 rel L2 on N(0,1) V")
@pytest.mark.parametrize("tokens,head_dim", CASES)
def test_full_pipeline_meets_rel_l2_target(tokens, head_dim):
    """The issue's 0.03 target, kept as is. e4m3 keeps 3 mantissa bits, so each rounded P and V
    element is off by ~2.5% rms; with zero-mean V those errors do not average out relative to the
    output, and exact scores with fp8 P.V alone measure 0.037. Strict: passing means it improved."""
    assert measured(tokens, head_dim)["full"][0] <= REL_L2_TARGET


def _int8_pv_against_running_max(q, k, v, block_n=128):
    """INT8 P quantized against each row's running maximum (one scale per row across key
    blocks, what an int32 P.V kept in the wgmma accumulator between blocks would need) instead
    of each block's own maximum (the kernels): the study behind docs/ATTENTION_8BIT.md's
    "Seventh session". Exact integer products in float64, like kernel_reference."""
    q_int, q_scale = a8.kernel_q(q)
    k_int, k_scale = a8.kernel_k(k, block_n)
    v_int, v_scale = a8.kernel_v(v)
    s = (q_int @ k_int.transpose(-1, -2)) * (q_scale.double() * k_scale.double())  # log2 domain
    m = torch.full(s.shape[:-1] + (1,), float("-inf"), dtype=torch.float64)
    acc, total = 0.0, 0.0
    for j in range(0, s.shape[-1], block_n):
        block = s[..., j:j + block_n]
        m_new = torch.maximum(m, block.amax(-1, keepdim=True))
        alpha = torch.exp2(m - m_new)
        p = torch.round(a8.INT8_MAX * torch.exp2(block - m_new))
        acc = acc * alpha + p @ v_int[..., j:j + block_n, :]
        total = total * alpha + p.sum(-1, keepdim=True)
        m = m_new
    running_max = torch.cummax(s.unflatten(-1, (-1, block_n)).amax(-1), dim=-1).values
    moved = running_max[..., 1:] > running_max[..., :-1]          # [B, H, rows, blocks - 1]
    fold_rate = moved.unflatten(-2, (-1, 64)).any(-2).double().mean().item()
    return (acc / total * v_scale.double()).float(), fold_rate


def test_int8_p_against_the_running_max_is_no_way_out():
    """Keeping the int32 P.V in the accumulator across blocks needs P scaled by the running row
    maximum; that costs 0.033 rel L2 (over the 0.03 bound, the kernels' per-block scale gives
    0.020), and some row of a 64-row tile raises its maximum in ~96% of the blocks, so the
    fold into fp32 it was meant to save would run almost every block anyway."""
    q, k, v = dit_like(4096, 128)
    ref = F.scaled_dot_product_attention(q, k, v)
    out, fold_rate = _int8_pv_against_running_max(q, k, v)
    per_block, _ = errors(a8.kernel_reference(q, k, v, block_n=128, pv="int8"), ref)
    running, _ = errors(out, ref)
    print(f"\nINT8 P per block {per_block:.4f}, against the running max {running:.4f} rel L2; "
          f"64-row tiles folding: {fold_rate:.1%} of blocks")
    assert per_block <= 0.021 < REL_L2_TARGET < running
    assert fold_rate > 0.9
