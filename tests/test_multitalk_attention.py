"""Audio cross-attention against independent references written here."""
import math

import torch

from wanvideo_infinitetalk.multitalk import audio_attention as at
from wanvideo_infinitetalk.multitalk.audio_proj import AudioContext

DIM, HEADS, ADIM = 16, 2, 8


def _attn(seed=0):
    torch.manual_seed(seed)
    a = at.AudioCrossAttention(DIM, HEADS, audio_dim=ADIM)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return a


def _reference(a, x, tokens, grid, q_pos=None, k_pos=None):
    """Per latent frame: softmax(q k^T / sqrt(d)) v over that frame's audio tokens only."""
    t, h, w = grid
    s, d = h * w, DIM // HEADS
    out = torch.empty_like(x)
    for b in range(x.shape[0]):
        for f in range(t):
            xf = x[b, f * s:(f + 1) * s]
            q = (xf @ a.q_linear.weight.T + a.q_linear.bias).view(s, HEADS, d)
            kv = (tokens[f] @ a.kv_linear.weight.T + a.kv_linear.bias).view(-1, 2, HEADS, d)
            k, v = kv[:, 0], kv[:, 1]
            if q_pos is not None:
                q = _rope_ref(q, q_pos[b, f * s:(f + 1) * s])
                k = _rope_ref(k, k_pos)
            att = torch.einsum("shd,nhd->hsn", q, k) / math.sqrt(d)
            o = torch.einsum("hsn,nhd->shd", att.softmax(-1), v).reshape(s, DIM)
            out[b, f * s:(f + 1) * s] = o @ a.proj.weight.T + a.proj.bias
    return out


def _rope_ref(x, pos):
    """Complex-number 1-D RoPE on adjacent channel pairs."""
    d = x.shape[-1]
    freqs = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rot = torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64),
                      pos.double()[:, None] * freqs)
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2).contiguous())
    return torch.view_as_real(xc * rot[:, None]).flatten(-2).to(x.dtype)


def test_one_speaker_equals_per_frame_reference():
    a = _attn()
    grid = (3, 2, 3)
    x = torch.randn(2, 18, DIM)
    tokens = torch.randn(3, 32, ADIM)
    ctx = AudioContext(tokens=tokens, n_speakers=1)
    assert not ctx.needs_attention_map
    torch.testing.assert_close(a(x, ctx, grid), _reference(a, x, tokens, grid), rtol=1e-4, atol=1e-5)


def test_frames_only_see_their_own_audio():
    a = _attn()
    grid = (2, 2, 2)
    x = torch.randn(1, 8, DIM)
    tokens = torch.randn(2, 32, ADIM)
    base = a(x, AudioContext(tokens, 1), grid)
    tokens2 = tokens.clone()
    tokens2[1] += 1.0
    changed = a(x, AudioContext(tokens2, 1), grid)
    torch.testing.assert_close(changed[:, :4], base[:, :4])
    assert not torch.allclose(changed[:, 4:], base[:, 4:])


def test_rope_1d_matches_complex_rotation():
    x = torch.randn(5, 3, 8)
    pos = torch.tensor([0.0, 2.0, 3.5, 12.0, 22.0])
    torch.testing.assert_close(at.rope_1d(x, pos), _rope_ref(x, pos), rtol=1e-5, atol=1e-5)


def test_audio_token_positions():
    pos = at.audio_positions(2)
    assert pos.shape == (64,)
    assert pos[:32].eq(2).all() and pos[32:].eq(22).all()


def test_visual_positions_on_hand_built_map():
    # 6 tokens; rows: speaker 1, speaker 2, background
    amap = torch.tensor([[[0.9, 0.5, 0.1, 0.1, 0.2, 0.1],
                          [0.0, 0.1, 0.8, 0.4, 0.1, 0.1],
                          [0.1, 0.4, 0.1, 0.5, 0.7, 0.0]]])
    pos = at.visual_positions(amap)[0]
    s1 = lambda v: (v - 0.1) / (0.9 - 0.1 + 1e-8) * 4          # noqa: E731  row-0 min 0.1, max 0.9
    s2 = lambda v: (v - 0.0) / (0.8 - 0.0 + 1e-8) * 4 + 20     # noqa: E731  row-1 min 0.0, max 0.8
    want = torch.tensor([s1(0.9), s1(0.5), s2(0.8), 12.0, 12.0, s1(0.1)])
    torch.testing.assert_close(pos, want)
    assert pos[0] == 4.0 and pos[2] == 24.0
    assert ((pos >= 0) & (pos <= 4) | (pos >= 20) & (pos <= 24) | (pos == 12)).all()


def test_affinity_map_matches_explicit_softmax():
    torch.manual_seed(1)
    b, length, s, h, d = 1, 12, 4, 2, 8
    q, k = torch.randn(b, length, h, d), torch.randn(b, length, h, d)
    masks = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.float32)
    got = at.affinity_map(q, k, masks, s)
    probs = (torch.einsum("blhd,bshd->bhls", q, k[:, :s]) / math.sqrt(d)).softmax(-1)
    want = torch.stack([(probs * m).sum(-1).div(m.sum()).mean(1) for m in masks], dim=1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_two_speakers_equals_reference_with_rope():
    a = _attn(2)
    grid = (2, 2, 2)
    x = torch.randn(1, 8, DIM)
    tokens = torch.randn(2, 64, ADIM)
    masks = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=torch.float32)
    ctx = AudioContext(tokens=tokens, n_speakers=2, masks=masks)
    assert ctx.needs_attention_map
    qk = (torch.randn(1, 8, HEADS, DIM // HEADS), torch.randn(1, 8, HEADS, DIM // HEADS))
    q_pos = at.visual_positions(at.affinity_map(*qk, masks, 4))
    k_pos = torch.cat([torch.full((32,), 2.0), torch.full((32,), 22.0)])
    want = _reference(a, x, tokens, grid, q_pos, k_pos)
    torch.testing.assert_close(a(x, ctx, grid, qk=qk), want, rtol=1e-4, atol=1e-5)
    # without RoPE the result would differ: the positions matter
    assert not torch.allclose(_reference(a, x, tokens, grid), want, atol=1e-4)


def test_two_speakers_without_qk_is_an_error():
    import pytest
    a = _attn()
    ctx = AudioContext(torch.randn(1, 64, ADIM), 2, masks=torch.ones(3, 4))
    with pytest.raises(ValueError, match="needs the self-attention"):
        a(torch.randn(1, 4, DIM), ctx, (1, 2, 2))
