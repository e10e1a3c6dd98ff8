"""Audio window bookkeeping and the audio projection (docs/REFERENCE_NOTES.md §3)."""
import torch

from wanvideo_infinitetalk.multitalk import audio_proj as ap
from wanvideo_infinitetalk.multitalk import audio_windows as aw


def _indexed_features(total):
    # feature value == wav2vec frame index, so gathered windows reveal their indices
    return torch.arange(total, dtype=torch.float32).view(total, 1, 1).expand(total, 2, 3).clone()


def _latent_indices(full, start, n_lat):
    win = aw.clip_windows(full, start, aw.video_frames_for_latents(n_lat))
    first, later = aw.latent_windows(win, n_lat)
    return first[:, 0, 0].long().tolist(), later[:, :, 0, 0].long().tolist()


def test_latent_entries_rule():
    entries = aw.latent_entries(21)
    assert entries[0] == [(0, s) for s in range(5)]
    assert entries[1] == [(1, 0), (1, 1), (1, 2), (2, 2), (3, 2), (4, 2), (4, 3), (4, 4)]
    assert entries[20] == [(77, 0), (77, 1), (77, 2), (78, 2), (79, 2), (80, 2), (80, 3), (80, 4)]


def test_window_indices_first_clip():
    first, later = _latent_indices(_indexed_features(200), 0, 21)
    assert first == [0, 0, 0, 1, 2]                      # clamped at the start
    assert later[0] == [0, 0, 1, 2, 3, 4, 5, 6]          # video frames 1..4
    assert later[-1] == [75, 76, 77, 78, 79, 80, 81, 82]  # video frames 77..80
    assert len(later) == 20


def test_window_indices_later_clip_uses_real_preceding_audio():
    first, later = _latent_indices(_indexed_features(200), 72, 21)
    assert first == [70, 71, 72, 73, 74]
    assert later[0] == [71, 72, 73, 74, 75, 76, 77, 78]
    assert later[-1] == [147, 148, 149, 150, 151, 152, 153, 154]


def test_clamp_at_end_and_reflect_padding():
    full = _indexed_features(50)
    padded = aw.reflect_pad(full, 81)
    assert padded.shape[0] == 50 + (81 - 50 + 3)
    assert padded[50:54, 0, 0].tolist() == [49, 48, 47, 46]  # official: flip of the last frames
    first, later = _latent_indices(full, 0, 21)
    # video frames 77..80 read rows 75..82 of the mirrored tail: row 50 + j holds frame 49 - j
    assert later[-1] == [24, 23, 22, 21, 20, 19, 18, 17]
    # a window ending before the last frame is not padded; one ending exactly at it is
    assert aw.reflect_pad(full, 49) is full
    assert aw.reflect_pad(full, 50).shape[0] == 53


def test_clip_windows_agree_with_long_video_plan():
    from wanvideo_infinitetalk.multitalk import long_video as lv
    for n in (50, 81, 82, 200, 300):
        plan = lv.plan_long_video(n)
        full = _indexed_features(n)
        for w in plan.windows:
            got = aw.clip_windows(full, w.audio_start, w.frames)[:, :, 0, 0].long().tolist()
            assert got == plan.window_audio_indices(w), (n, w.audio_start)


def test_make_context_equals_manual_projection():
    torch.manual_seed(0)
    m = ap.AudioProjModel(layers=2, channels=4, intermediate=8, tokens=3, out_dim=6)
    feats = torch.randn(2, 9, 5, 2, 4)
    ctx = m.make_context(ap.AudioInput(feats, masks=torch.ones(2, 4, 4)), (3, 2, 2))
    assert ctx.tokens.shape == (3, 6, 6) and ctx.n_speakers == 2 and ctx.needs_attention_map

    def project(spk, k):
        if k == 0:
            h = torch.relu(m.proj1(feats[spk, 0].reshape(-1)))
        else:
            f = feats[spk, 4 * k - 3:4 * k + 1]
            x = torch.cat([f[0, 0:3], f[1, 2:3], f[2, 2:3], f[3, 2:5]])
            h = torch.relu(m.proj1_vf(x.reshape(-1)))
        tok = m.proj3(torch.relu(m.proj2(h))).view(3, 6)
        return torch.nn.functional.layer_norm(tok, (6,), m.norm.weight, m.norm.bias, m.norm.eps)

    for k in range(3):
        want = torch.cat([project(0, k), project(1, k)])  # speaker 1's tokens first
        torch.testing.assert_close(ctx.tokens[k], want)
    assert ctx.masks.shape == (3, 4)


def test_single_speaker_context_and_silent():
    m = ap.AudioProjModel(layers=2, channels=4, intermediate=8, tokens=3, out_dim=6)
    audio = ap.AudioInput(torch.randn(5, 5, 2, 4))  # speaker axis optional for one speaker
    ctx = m.make_context(audio, (2, 1, 1))
    assert ctx.tokens.shape == (2, 3, 6) and not ctx.needs_attention_map and ctx.masks is None
    assert audio.silent().features.abs().sum() == 0


def test_audio_input_errors():
    import pytest
    with pytest.raises(ValueError, match="2 masks"):
        ap.AudioInput(torch.zeros(2, 5, 5, 2, 4), masks=torch.ones(3, 4, 4))
    with pytest.raises(ValueError, match="need speaker masks"):
        ap.AudioInput(torch.zeros(2, 5, 5, 2, 4))
    m = ap.AudioProjModel(layers=2, channels=4, intermediate=8, tokens=3, out_dim=6)
    with pytest.raises(ValueError, match="need 9"):
        m.make_context(ap.AudioInput(torch.zeros(1, 5, 5, 2, 4)), (3, 1, 1))
