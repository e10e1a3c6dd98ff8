"""Chunked wav2vec2 on long audio: the features equal the one-piece result, and memory stays bounded.

Tiny encoders (32 channels, hidden 32, 12 layers, the real conv kernels and strides) with chunk
sizes far below the defaults, so clips of a few seconds span many chunks of every kind.
"""
import weakref
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wanvideo_infinitetalk.multitalk import audio_features as af
from wanvideo_infinitetalk.multitalk import tiny
from wanvideo_infinitetalk.multitalk import wav2vec2 as w2v
from wanvideo_infinitetalk.wanvideo import placement

HOP, FIELD = 320, 400  # conv stack of the real model: output frame j reads samples [320 j, 320 j + 400)


def _encoder(norm: str, stable: bool, seed: int = 0) -> w2v.Wav2Vec2Encoder:
    """Random tiny encoder; the GroupNorm variant gets a conv bias far from zero so its
    per-channel statistics have a large mean (the case a naive sum of squares gets wrong)."""
    cfg = dict(tiny.tiny_wav2vec2_config(), feat_extract_norm=norm, do_stable_layer_norm=stable,
               conv_bias=norm == "group")
    torch.manual_seed(seed)
    model = w2v.Wav2Vec2Encoder(w2v.Wav2Vec2Config.from_dict(cfg)).eval().requires_grad_(False)
    if norm == "group":
        bias = model.feature_extractor.conv_layers[0].conv.bias
        placement.set_tensor(model, "feature_extractor.conv_layers.0.conv.bias", bias + 3.0)
    return model


@pytest.fixture(scope="module", params=[("group", False), ("layer", True)], ids=["group", "layer"])
def encoder(request):
    return _encoder(*request.param)


def _speech(samples: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 16000
    x = 0.1 * np.sin(2 * np.pi * 200 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    return (x + 0.02 * rng.standard_normal(samples)).astype(np.float32)


def _small(tokens_per_block: int, heads: int, tokens: int, conv_frames: int = 37, rows: int = 29):
    """Tiny chunks everywhere; attention in blocks even where a fused SDPA kernel would stream."""
    return w2v.Chunking(conv_frames=conv_frames, rows=rows, trust_fused_attention=False,
                        score_elements=heads * tokens * tokens_per_block)


# conv frame counts: an exact multiple of the 37-frame chunk, one frame more (a 1-frame last
# chunk), and an arbitrary length with samples left over after the last frame
@pytest.mark.parametrize("samples", [(111 - 1) * HOP + FIELD, 111 * HOP + FIELD, 84_817])
def test_chunked_features_equal_one_piece(encoder, samples):
    x = _speech(samples)
    n = af.check_length(samples)
    chunking = _small(17, encoder.config.num_attention_heads, n)
    assert chunking.query_rows(encoder.config.num_attention_heads, n) == 17 < n
    whole = af.wav2vec_features(encoder, x, chunking=w2v.ONE_SHOT)
    parts = af.wav2vec_features(encoder, x, chunking=chunking)
    assert parts.shape == whole.shape == (n, 12, 32)
    assert (parts - whole).abs().max().item() <= 1e-5


def test_conv_chunks_match_frame_for_frame(encoder):
    wave = torch.from_numpy(af.normalize(_speech(16000 * 2 + 77)))[None]
    with torch.no_grad():
        whole = encoder.conv_features(wave, w2v.ONE_SHOT)
        for frames in (1, 7, 100, whole.shape[1] - 1):
            parts = encoder.conv_features(wave, w2v.Chunking(conv_frames=frames))
            assert parts.shape == whole.shape
            # float rounding only: conv kernels sum in a different order on other lengths
            assert (parts - whole).abs().max() <= 4e-6 * whole.abs().max()


def test_encoder_blocks_match_one_piece(encoder):
    torch.manual_seed(1)
    feats = torch.randn(2, 203, 32)  # a batch of two: blocks must not mix clips
    heads = encoder.config.num_attention_heads
    with torch.no_grad():
        whole = encoder.layer_outputs(feats, w2v.ONE_SHOT)
        for rows, block in ((13, 1), (64, 50), (1000, 11)):
            parts = encoder.layer_outputs(feats, _small(block, heads, 203, rows=rows))
            assert (parts - whole).abs().max().item() <= 1e-5
        host = torch.full_like(whole, float("nan"))
        assert encoder.layer_outputs(feats, _small(9, heads, 203), out=host) is host
    assert (host - whole).abs().max().item() <= 1e-5


def test_short_clips_take_the_one_piece_path(encoder):
    """Default chunks hold 20 s of conv frames and 4096 tokens: a few seconds is one chunk,
    computed exactly as before (bit for bit)."""
    x = _speech(16000 * 3)
    torch.testing.assert_close(af.wav2vec_features(encoder, x),
                               af.wav2vec_features(encoder, x, chunking=w2v.ONE_SHOT), rtol=0, atol=0)


def test_query_rows_bound_the_scores():
    c = w2v.Chunking(score_elements=12 * 15_000 * 100)
    assert c.query_rows(12, 15_000) == 100
    assert c.query_rows(12, 50) == 50  # never more than the tokens
    assert w2v.Chunking(score_elements=10).query_rows(12, 15_000) == 1  # at least one row
    assert w2v.DEFAULT_CHUNKING.query_rows(12, 15_000) * 12 * 15_000 * 4 <= 256 * 2 ** 20


def test_fused_attention_takes_all_queries_at_once(monkeypatch):
    """Flash / memory-efficient kernels never hold the scores, so blocks would only cost speed."""
    probe = torch.randn(1, 4, 203, 8)
    if not w2v._fused_sdpa(probe, probe, probe):
        pytest.skip("this torch runs fp32 CPU attention on the math backend")
    encoder, feats = _encoder("group", False), torch.randn(1, 203, 32)
    calls, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v: calls.append(q.shape[2]) or sdpa(q, k, v))
    tight = w2v.Chunking(score_elements=4 * 203 * 10)
    with torch.no_grad():
        trusted = encoder.layer_outputs(feats, tight)
        assert calls == [203] * 12
        calls.clear()
        blocked = encoder.layer_outputs(feats, replace(tight, trust_fused_attention=False))
    assert calls == ([10] * 20 + [3]) * 12
    assert (trusted - blocked).abs().max().item() <= 1e-5


class _PeakBytes(TorchDispatchMode):
    """Peak bytes of CPU tensor storages that torch ops create while active (a storage shared by
    views counts once; it is freed when the last tensor using it is collected)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.users: dict[int, int] = {}

    def _release(self, key: int, nbytes: int):
        self.users[key] -= 1
        if not self.users[key]:
            del self.users[key]
            self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key not in self.users:
                    self.users[key] = 0
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                self.users[key] += 1
                weakref.finalize(t, self._release, key, nbytes)
        return out


def _peak(encoder, x, chunking) -> int:
    with _PeakBytes() as m:
        af.wav2vec_features(encoder, x, chunking=chunking)
    return m.peak


def test_chunked_peak_memory_is_bounded():
    """One piece grows with the clip (the first conv layers hold 3,200 frames a second); chunked,
    only the clip-sized buffers grow (conv features, tokens, the [T, 12, 32] result)."""
    encoder = _encoder("group", False)
    short, long = _speech(16000 * 8), _speech(16000 * 16)
    small = w2v.Chunking(conv_frames=50, rows=16, score_elements=4 * 400 * 16)
    whole = _peak(encoder, short, w2v.ONE_SHOT), _peak(encoder, long, w2v.ONE_SHOT)
    parts = _peak(encoder, short, small), _peak(encoder, long, small)
    out_bytes = (400 - 200) * 12 * 32 * 4
    assert whole[1] > 1.8 * whole[0]
    assert parts[1] < whole[1] / 4
    assert parts[1] - parts[0] < 4 * out_bytes < (whole[1] - whole[0]) / 4
