"""Pure-torch emulation of the numerics of the pack's planned 8-bit attention kernel (Ada/Hopper).

This is the reference the future Triton kernel is tested against, so it reproduces every rounding
step the kernel will take, not just the overall idea. It runs anywhere torch runs (CPU included)
and is slow: it is meant for tests and accuracy studies, never for sampling.

The recipe, in the order the kernel applies it (q, k, v are [batch, heads, tokens, head_dim]):

1. K smoothing. K loses its per-head mean over tokens (estimated from a subsample, see
   MEAN_SAMPLES): k_j -> k_j - mean(k). Every score of query
   i changes by the same amount, q_i . mean(k), so each row of Q K^T is shifted by a constant and
   softmax (shift invariant per row) is exactly unchanged. What changes is K's range: video DiTs
   put a large shared per-channel bias on K, which would otherwise set the INT8 step size and bury
   the part of K that actually varies between tokens.
2. INT8 Q and K, symmetric, one scale per block of tokens per head: blocks of `block_q` query
   tokens and `block_k` key tokens, scale = amax(|block|) / 127, round to nearest (even), clamp
   to [-127, 127]. A block is one kernel tile, so its scale is a scalar the tile multiplies by
   once; the last block may be partial (the kernel masks the rows it loads past the end).
3. Scores. The int8 products are summed in int32 on the tensor cores, which is exact; here the
   integers are multiplied in float64, also exact because every partial sum is an integer below
   127 * 127 * head_dim << 2**53. The integer result becomes fp32 and is multiplied by the Q
   block scale, the K block scale and the softmax scale 1/sqrt(head_dim).
4. Softmax in fp32 with the row maximum subtracted, so every probability lies in [0, 1].
5. FP8 (e4m3) P and V, fp32 accumulation. V gets one scale per channel (head_dim column) per head,
   amax / 448: a per-column scale is constant along the P.V reduction, so it factors out of the
   sum and is applied once to the accumulator. P is stored as fp8(P * 448) with the fixed scale
   448 = the e4m3 maximum: the row maximum has P = 1 exactly, so the fixed scale already uses the
   full range of every row and the kernel needs no per-row scale or extra reduction.
6. Normalisation by the row sum, in fp32. The default sums the *quantized* probabilities: then the
   output is an exact weighted average of the quantized V rows whose weights sum to one, and
   probabilities that fp8 flushes to zero (P * 448 below half the smallest subnormal, P < ~2e-6)
   leave numerator and denominator together instead of shrinking the output towards zero.
   `row_sum="exact"` sums the fp32 probabilities instead, for comparison.

Direct versus block-online softmax. `online=False` takes the max over the whole row at once. The
kernel cannot: it walks the key blocks keeping a running max m, a running sum l and an fp32
accumulator, and when a new block raises m it multiplies l and the accumulator by exp(m_old -
m_new). In exact arithmetic both give the same result, and with fp32 probabilities they agree up to
fp32 rounding. With fp8 P they differ by more: a block processed before the final max was
seen is quantized as fp8(448 * exp(s - m_old)), a different rounding grid than the direct version's,
so the two differ by about the fp8 rounding error of those blocks (0.023 rel L2 at 1,000 tokens,
against 0.038 for either versus fp32) with no systematic bias.
`online=True` emulates the kernel's loop exactly (same running max per key block), so GPU tests can
compare against either.
"""
from __future__ import annotations

import math

import torch

INT8_MAX = 127.0
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
BLOCK_Q = 128
BLOCK_K = 64
# Query rows per emulation step. Rows are independent, so this only bounds memory (an 8k x 8k
# float64 score matrix per head would be 0.5 GB); a multiple of the blocks keeps it readable.
ROW_CHUNK = 1024


# The smoothing mean is taken over every mean_stride(n)-th key, at least MEAN_SAMPLES of them:
# any vector subtracted from all keys leaves the softmax exact (step 1), the mean only has to be
# close enough to centre K's range, and reading 1,024 keys instead of 32,760 saves the K/V pass
# a full read of K (~0.1 ms on an H200 at 32,760 tokens and 40 heads).
MEAN_SAMPLES = 1024


def mean_stride(keys: int) -> int:
    return max(1, keys // MEAN_SAMPLES)


def smooth_keys(k: torch.Tensor, valid_keys: int) -> torch.Tensor:
    """K minus its per-head mean over every mean_stride-th of the first `valid_keys` tokens
    (fp32); rows past them become zero, as the kernel's masked loads make them, so they cannot
    enlarge a block's scale."""
    k = k.float()
    mean = k[..., :valid_keys:mean_stride(valid_keys), :].mean(dim=-2, keepdim=True)
    return _zero_rows_from(k - mean, valid_keys)


def _zero_rows_from(x: torch.Tensor, valid: int) -> torch.Tensor:
    if valid >= x.shape[-2]:
        return x
    keep = torch.arange(x.shape[-2], device=x.device) < valid
    return torch.where(keep[:, None], x, torch.zeros((), dtype=x.dtype, device=x.device))


def block_scales(x: torch.Tensor, block: int, qmax: float = INT8_MAX) -> torch.Tensor:
    """Per-token view [..., tokens, 1] of the scale amax(|block|) / qmax of each block of `block`
    tokens (per batch and head). The last block may be partial: padding it with zeros leaves its
    amax unchanged, which is what a masked tile load does."""
    tokens = x.shape[-2]
    blocks = -(-tokens // block)
    padded = torch.nn.functional.pad(x.abs(), (0, 0, 0, blocks * block - tokens))
    amax = padded.unflatten(-2, (blocks, block)).amax(dim=(-2, -1))
    # An all-zero block (only padding) would divide 0 by 0; any positive scale quantizes it to 0.
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return scale.repeat_interleave(block, dim=-1)[..., :tokens, None]


def quantize_int8_blocks(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer values in [-127, 127] held as float64, per-token fp32 scale [..., tokens, 1])."""
    x = x.float()
    scale = block_scales(x, block)
    ints = torch.round(x / scale).clamp_(-INT8_MAX, INT8_MAX)
    return ints.double(), scale


def to_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to the nearest float8_e4m3fn value, back in fp32. Clamped first because
    the cast does not saturate (beyond the range it gives NaN) and x / (amax / 448) can land a
    hair above 448."""
    return x.clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float()


def quantize_v(v: torch.Tensor, valid_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 V values in fp32, per-channel scale [batch, heads, 1, head_dim])."""
    v = _zero_rows_from(v.float(), valid_keys)
    amax = v.abs().amax(dim=-2, keepdim=True)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    return to_e4m3(v / scale), scale


def int8_scores(q_int, q_scale, k_int, k_scale, softmax_scale: float) -> torch.Tensor:
    """fp32 scores from exact integer dot products (float64 stands in for int32 accumulation)."""
    exact = torch.matmul(q_int, k_int.transpose(-2, -1))
    return exact.float() * (q_scale * k_scale.transpose(-2, -1)) * softmax_scale


def _mask_keys(scores: torch.Tensor, valid_keys: int) -> torch.Tensor:
    if valid_keys >= scores.shape[-1]:
        return scores
    past_end = torch.arange(scores.shape[-1], device=scores.device) >= valid_keys
    return scores.masked_fill(past_end, float("-inf"))


def _direct_rows(scores, v_fp8, row_sum: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(unnormalised P.V in fp32, row sum) with one max per whole row."""
    p = torch.exp(scores - scores.amax(dim=-1, keepdim=True))
    p_fp8 = to_e4m3(p * E4M3_MAX)
    total = (p_fp8 / E4M3_MAX if row_sum == "quantized" else p).sum(dim=-1, keepdim=True)
    return torch.matmul(p_fp8, v_fp8) / E4M3_MAX, total


def _online_rows(scores, v_fp8, row_sum: str, block_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's loop: one key block at a time, running max m, running sum l, accumulator acc;
    a larger max rescales what was accumulated by exp(m_old - m_new), in fp32."""
    rows = scores.shape[:-1]
    m = scores.new_full((*rows, 1), float("-inf"))
    total = scores.new_zeros((*rows, 1))
    acc = scores.new_zeros((*rows, v_fp8.shape[-1]))
    for start in range(0, scores.shape[-1], block_k):
        s = scores[..., start:start + block_k]
        m_new = torch.maximum(m, s.amax(dim=-1, keepdim=True))
        # The first block has at least one real key, so m_new is finite from then on.
        alpha = torch.exp(m - m_new)
        p = torch.exp(s - m_new)
        p_fp8 = to_e4m3(p * E4M3_MAX)
        part = (p_fp8 / E4M3_MAX if row_sum == "quantized" else p).sum(dim=-1, keepdim=True)
        total = total * alpha + part
        acc = acc * alpha + torch.matmul(p_fp8, v_fp8[..., start:start + block_k, :]) / E4M3_MAX
        m = m_new
    return acc, total


def _check(q, k, v, row_sum: str) -> None:
    if (q.dim() != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2]
            or q.shape[-1] != k.shape[-1]):
        raise ValueError(f"expected q [B,H,Lq,D], k/v [B,H,Lk,D]; got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.shape[-1] not in (64, 128):
        raise ValueError(f"head_dim {q.shape[-1]} is not supported; the kernel plans 64 and 128")
    if row_sum not in ("quantized", "exact"):
        raise ValueError(f"row_sum must be 'quantized' or 'exact', not {row_sum!r}")


def attention_8bit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, smooth: bool = True,
                   block_q: int = BLOCK_Q, block_k: int = BLOCK_K, online: bool = False,
                   row_sum: str = "quantized", valid_keys: int | None = None) -> torch.Tensor:
    """Emulated 8-bit attention: q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D] in q's dtype.

    `valid_keys`: only the first `valid_keys` keys are real (the rest is padding, e.g. from the
    sequence-parallel split); they are excluded from the mean, the scales and the softmax.
    `smooth=False` skips the K smoothing (for accuracy studies only)."""
    _check(q, k, v, row_sum)
    valid = k.shape[-2] if valid_keys is None else int(valid_keys)
    if not 0 < valid <= k.shape[-2]:
        raise ValueError(f"valid_keys {valid} outside 1..{k.shape[-2]}")
    k32 = smooth_keys(k, valid) if smooth else _zero_rows_from(k.float(), valid)
    k_int, k_scale = quantize_int8_blocks(k32, block_k)
    v_fp8, v_scale = quantize_v(v, valid)
    q_int, q_scale = quantize_int8_blocks(q, block_q)
    softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    outs = []
    for start in range(0, q.shape[-2], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        scores = int8_scores(q_int[..., rows, :], q_scale[..., rows, :], k_int, k_scale,
                             softmax_scale)
        scores = _mask_keys(scores, valid)
        acc, total = (_online_rows(scores, v_fp8, row_sum, block_k) if online
                      else _direct_rows(scores, v_fp8, row_sum))
        outs.append(acc * v_scale / total)
    return torch.cat(outs, dim=-2).to(q.dtype)


def attention_8bit_unsmoothed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              **options) -> torch.Tensor:
    """The same emulation without K smoothing: what the INT8 path costs when K keeps its bias."""
    return attention_8bit(q, k, v, smooth=False, **options)


# ----------------------------------------------------------------------------- the kernel's recipe
# wanvideo/attention_int8.py implements the recipe below, which differs from the study above in
# three ways, all for accuracy: the fp8 P.V above costs 0.037 rel L2 by itself on N(0, 1) V (three
# mantissa bits, ~2.5% rms per element, and a random V does not average that out relative to the
# output), over the 0.03 target. INT8 P.V with the scales below measures 0.018 (64-key blocks)
# to 0.020 (128, the kernel's default) in total.
#   - Q: one scale per token (row) instead of per block. The kernel quantizes its Q tile itself
#     and a per-row scale folds into the per-row factor it multiplies the scores by anyway: free.
#   - V: INT8 with one scale per channel (amax / 127): 7 bits of uniform precision where V's
#     values are, against e4m3's 3 mantissa bits.
#   - P: INT8 with one scale per row *per key block*: p = exp2(s - m_block) * 127 where m_block is
#     the row's max within the block, which the online softmax computes anyway. The block's
#     weight exp2(m_block - m_running) multiplies the exact int32 P.V product once per row, in fp32
#     (the two-level accumulation: exact integers inside a block, fp32 across blocks).
# pv="bf16" is the alternative the kernel also offers (SageAttention 1's choice): P = exp2(s - m)
# and V rounded to bf16, the product accumulated in fp32 (0.012 rel L2: the INT8 Q.K^T alone).
# Scores are kept in the log2 domain (the kernel uses exp2) with the per row and block factor
# c = qscale * kscale, qscale = amax_q * log2(e) / (sqrt(D) * 127): a block's row max is
# n_max * c and its probabilities exp2((n - n_max) * c), n the integer scores (n - n_max is exact,
# so only the product rounds). Roundings to integers are half to even of the exact product, as
# the kernel's fma(x, scale, 1.5 * 2**23) does them. Only the GPU's exp2 (an approximation a few
# ulp off) separates kernel and reference: it moves an integer by one step now and then, so they
# agree closely, not bit for bit (tests/test_attention_int8.py bounds the difference; under the
# Triton interpreter, whose exp2 is numpy's, they agree bit for bit).
KERNEL_BLOCK_N = 128
KERNEL_PV = "int8"
MAGIC = 12582912.0  # 1.5 * 2**23: the kernel reads an int32 n as the float MAGIC + n
LOG2E = 1.4426950408889634


def int8_inverse(amax: torch.Tensor) -> torch.Tensor:
    """127 / amax (0 where amax is 0) by IEEE division, as the kernel's div_rn. Not `127 / amax`
    in torch: a scalar divided by a tensor is a reciprocal times the scalar, two roundings, and
    bf16 inputs put q * inv within an ulp of x.5 often enough for that to show."""
    inv = torch.div(torch.full_like(amax, INT8_MAX), amax)
    return torch.where(amax > 0, inv, torch.zeros_like(amax))


def round_product(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """round(x * scale) of fp32 operands, half to even, of the exact product (float64 holds it:
    24 + 24 bits): what the kernel's single FMA with 1.5 * 2**23 computes. As float64."""
    return torch.round(x.double() * scale.double())


def int8_scale(amax: torch.Tensor) -> torch.Tensor:
    """amax / 127 by IEEE division (on CUDA, torch divides by a scalar with a reciprocal)."""
    return torch.div(amax, torch.full_like(amax, INT8_MAX))


def kernel_q(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values as float64, fp32 per-row score factor qscale [..., tokens, 1])."""
    q = q.float()
    amax = q.abs().amax(dim=-1, keepdim=True)
    inv = int8_inverse(amax)
    factor = torch.tensor(LOG2E / (math.sqrt(q.shape[-1]) * INT8_MAX), dtype=torch.float32)
    return round_product(q, inv), amax * factor


def kernel_k(k: torch.Tensor, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoothed K: (int8 values as float64, fp32 per-key scale [..., 1, keys]), one scale per
    block of `block_n` keys (amax / 127)."""
    smoothed = smooth_keys(k, k.shape[-2])
    tokens = k.shape[-2]
    blocks = -(-tokens // block_n)
    padded = torch.nn.functional.pad(smoothed.abs(), (0, 0, 0, blocks * block_n - tokens))
    amax = padded.unflatten(-2, (blocks, block_n)).amax(dim=(-2, -1))
    per_key = int8_inverse(amax).repeat_interleave(block_n, dim=-1)[..., :tokens, None]
    scale = int8_scale(amax).repeat_interleave(block_n, dim=-1)[..., None, :tokens]
    return round_product(smoothed, per_key), scale


def kernel_v(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values as float64, fp32 per-channel scale [..., 1, D]) with amax / 127 per channel."""
    v = v.float()
    amax = v.abs().amax(dim=-2, keepdim=True)
    return round_product(v, int8_inverse(amax)), int8_scale(amax)


def _fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fp32 fma(a, b, c) with one rounding, as the GPU computes it: float64 holds the exact
    product of two fp32 values, and here the sum too (the addend has the product's magnitude)."""
    return (a.double() * b.double() + c.double()).float()


def _kernel_block(acc, m, total, s, c, valid, v_block, pv: str):
    """One key block of the kernel's online loop (see the notes above); `s` integer scores as
    float64 (-inf past the end), `c` the fp32 factor (one per row), `valid` the real keys."""
    s_max = s.amax(dim=-1, keepdim=True)
    f, f_max = (s + MAGIC).float(), (s_max + MAGIC).float()  # what the kernel's product holds
    m_block = s_max.float() * c
    m_new = torch.maximum(m, m_block)
    alpha = torch.exp2(m - m_new)
    shift = -(f_max * c) if pv == "int8" else (m_block - m_new) - f_max * c
    x = torch.where(valid, _fma32(f, c, shift), torch.tensor(float("-inf")))
    p = torch.exp2(x)
    if pv == "int8":
        p_scale = torch.exp2(m_block - m_new)
        p_int = round_product(p, torch.tensor(INT8_MAX))
        total = total * alpha + p_scale * p_int.sum(dim=-1, keepdim=True).float()
        return acc * alpha + torch.matmul(p_int, v_block).float() * p_scale, m_new, total
    p16 = p.to(torch.bfloat16).double()
    total = total * alpha + p.sum(dim=-1, keepdim=True)
    return acc * alpha + torch.matmul(p16, v_block).float(), m_new, total


def _kernel_rows(exact, factor, v_int, block_n: int, keys: int, pv: str):
    """The kernel's online loop over key blocks: exact integer scores (float64, padded to whole
    blocks), their fp32 factor per element (constant within a row's block)."""
    rows = exact.shape[:-1]
    m = factor.new_full((*rows, 1), float("-inf"))
    total = factor.new_zeros((*rows, 1))
    acc = factor.new_zeros((*rows, v_int.shape[-1]))
    columns = torch.arange(exact.shape[-1])
    for start in range(0, exact.shape[-1], block_n):
        block = slice(start, start + block_n)
        c = factor[..., start:start + 1]
        acc, m, total = _kernel_block(acc, m, total, exact[..., block], c, columns[block] < keys,
                                      v_int[..., block, :], pv)
    return acc, total


def kernel_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                     block_n: int = KERNEL_BLOCK_N, pv: str = KERNEL_PV) -> torch.Tensor:
    """The kernel's numerics in torch: q [B, H, Lq, D], k/v [B, H, Lk, D] -> [B, H, Lq, D] in q's
    dtype. `block_n` and `pv` ("int8", or "bf16": P and V in bf16) must be the kernel's."""
    _check(q, k, v, "quantized")
    q_int, q_scale = kernel_q(q)
    k_int, k_scale = kernel_k(k, block_n)
    if pv == "int8":
        v_int, v_scale = kernel_v(v)
    else:
        v_int, v_scale = v.to(torch.bfloat16).double(), torch.ones((), dtype=torch.float32)
    keys = k.shape[-2]
    pad = -keys % block_n
    v_int = torch.nn.functional.pad(v_int, (0, 0, 0, pad))
    outs = []
    for start in range(0, q.shape[-2], ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        exact = torch.matmul(q_int[..., rows, :], k_int.transpose(-2, -1))
        exact = torch.nn.functional.pad(exact, (0, pad), value=float("-inf"))
        factor = torch.nn.functional.pad(q_scale[..., rows, :] * k_scale, (0, pad), value=1.0)
        acc, total = _kernel_rows(exact, factor, v_int, block_n, keys, pv)
        outs.append(acc / total * v_scale)
    return torch.cat(outs, dim=-2).to(q.dtype)
