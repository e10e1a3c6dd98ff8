"""wav2vec2 encoder (vs transformers), the audio feature recipe, and two-speaker inputs."""
import numpy as np
import pytest
import torch

from wanvideo_infinitetalk.multitalk import audio_features as af
from wanvideo_infinitetalk.multitalk import speakers, tiny
from wanvideo_infinitetalk.multitalk import wav2vec2 as w2v
from wanvideo_infinitetalk.wanvideo import placement


@pytest.fixture(scope="module", params=["old", "new"])
def tiny_w2v(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(f"w2v_{request.param}"))
    return tiny.write_tiny_wav2vec2(folder, seed=3, pos_style=request.param)


def test_layers_equal_transformers_hidden_states(tiny_w2v):
    transformers = pytest.importorskip("transformers")
    ref = transformers.Wav2Vec2Model.from_pretrained(tiny_w2v).eval()
    ours = w2v.load_wav2vec2(tiny_w2v)
    assert placement.check_layout(ours) == []
    wave = torch.randn(1, 12000)
    with torch.no_grad():
        hs = ref(wave, output_hidden_states=True).hidden_states
        conv = ours.conv_features(wave)
        mine = ours.layer_outputs(conv)[0]
    want = torch.stack(hs[1:], dim=2)[0]
    assert mine.shape == want.shape == (conv.shape[1], 12, 32)
    torch.testing.assert_close(mine, want, rtol=1e-4, atol=1e-5)
    # the feature path with interpolation length == conv frame count is the same computation
    speech = wave[0].numpy()
    feats = af.wav2vec_features(ours, speech, n_frames=conv.shape[1])
    normed = torch.from_numpy(af.normalize(speech))[None]
    with torch.no_grad():
        want2 = torch.stack(ref(normed, output_hidden_states=True).hidden_states[1:], dim=2)[0]
    torch.testing.assert_close(feats, want2, rtol=1e-4, atol=1e-5)


def test_single_safetensors_file_infers_config(tiny_w2v):
    import os
    a = w2v.load_wav2vec2(tiny_w2v)
    file = os.path.join(tiny_w2v, "model.safetensors")
    assert w2v.load_wav2vec2(file).config.num_attention_heads == 1  # 32 / 64: heads need a hint
    b = w2v.load_wav2vec2(file, base_config=w2v.Wav2Vec2Config(hidden_size=32, num_attention_heads=4))
    assert b.config.hidden_size == 32 and b.config.num_hidden_layers == 12
    assert b.config.num_conv_pos_embeddings == 16 and b.config.num_conv_pos_embedding_groups == 4
    wave = torch.randn(1, 4000)
    with torch.no_grad():
        torch.testing.assert_close(a.layer_outputs(a.conv_features(wave)),
                                   b.layer_outputs(b.conv_features(wave)))


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return w2v.load_wav2vec2(tiny.write_tiny_wav2vec2(str(tmp_path_factory.mktemp("w2v")), seed=1))


def _speech(seconds, sr, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    mono = 0.1 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    mono = mono + 0.01 * rng.standard_normal(mono.shape)
    return torch.tensor(np.stack([mono * (c + 1) / channels for c in range(channels)]), dtype=torch.float32)


@pytest.mark.parametrize("sr,channels", [(16000, 1), (48000, 2), (8000, 1)])
def test_audio_features_any_rate_and_channels(encoder, sr, channels):
    wav = _speech(1.0, sr, channels)
    feats = af.audio_features(encoder, wav, sr)
    assert feats.shape == (25, 12, 32) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()


def test_loudness_is_normalised_to_minus_23():
    import pyloudnorm as pyln
    x = af.prepare_speech(_speech(2.0, 16000), 16000)
    assert abs(pyln.Meter(16000).integrated_loudness(x.astype(np.float64)) - (-23.0)) < 0.1


def test_silent_audio_skips_loudness(encoder):
    x, applied = af.loudness_normalize(np.zeros(16000))
    assert not applied and not x.any()
    feats = af.audio_features(encoder, torch.zeros(1, 16000), 16000)
    assert feats.shape == (25, 12, 32) and torch.isfinite(feats).all()


def test_audio_shorter_than_a_frame_is_a_clear_error(encoder):
    with pytest.raises(ValueError, match=r"0\.0200 s \(320 samples.*0\.04 s \(640 samples\)"):
        af.audio_features(encoder, torch.zeros(320), 16000)
    assert af.audio_features(encoder, _speech(0.1, 16000), 16000).shape[0] == 2  # < 1 BS.1770 block


def test_two_speaker_modes():
    a1, a2 = np.ones(100, np.float32), 2 * np.ones(60, np.float32)
    t1, t2 = speakers.combine_tracks([a1, a2], "add")
    assert t1.shape == t2.shape == (160,)
    assert (t1[:100] == 1).all() and (t1[100:] == 0).all()
    assert (t2[:100] == 0).all() and (t2[100:] == 2).all()
    p1, p2 = speakers.combine_tracks([a1, a2], "para")
    assert p1.shape == p2.shape == (100,) and (p2[60:] == 0).all() and (p2[:60] == 2).all()
    with pytest.raises(ValueError, match="mode"):
        speakers.combine_tracks([a1, a2], "mix")


def test_two_speakers_with_one_audio_is_an_error():
    with pytest.raises(ValueError, match="two-speaker mode needs two audio inputs"):
        speakers.require_tracks(1, 2)
    speakers.require_tracks(1, 1)


def test_speaker_masks():
    assert speakers.speaker_masks(1, 64, 64) is None
    m = speakers.speaker_masks(2, 100, 200)
    assert m.shape == (2, 100, 200)
    rows = m[0].any(dim=1).nonzero().flatten()
    cols0, cols1 = m[0].any(dim=0).nonzero().flatten(), m[1].any(dim=0).nonzero().flatten()
    assert (rows.min().item(), rows.max().item()) == (5, 94)
    assert (cols0.min().item(), cols0.max().item()) == (5, 94)
    assert (cols1.min().item(), cols1.max().item()) == (105, 194)
    b = speakers.speaker_masks(2, 100, 200, boxes=[(0, 0, 50, 100), (0.5, 0.0, 1.0, 0.5)])
    assert b[0, :, :50].all() and not b[0, :, 50:].any()
    assert b[1, :50, 100:].all() and not b[1, 50:].any()
    g = speakers.speaker_masks(2, 10, 20, masks=torch.ones(2, 5, 5))
    assert g.shape == (2, 10, 20) and g.all()
    with pytest.raises(ValueError, match="two speakers need 2 masks, got 3"):
        speakers.speaker_masks(2, 10, 20, masks=torch.ones(3, 5, 5))
    with pytest.raises(ValueError, match="2 bounding boxes, got 1"):
        speakers.speaker_masks(2, 10, 20, boxes=[(0, 0, 5, 5)])
