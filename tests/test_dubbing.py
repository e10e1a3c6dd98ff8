"""Dubbing in the library: each window's image condition and CLIP tokens come from its scheduled
source frame (spied through the VAE, the CLIP encoder and the model's inputs), only the scheduled
frames are decoded from a real video file, and the rest of the loop is image mode unchanged."""
from __future__ import annotations

import os

import pytest
import torch

from test_pipeline import StandInVAE, make_request, tiny_model
from wanvideo_infinitetalk.multitalk.dubbing import dubbing_conditions
from wanvideo_infinitetalk.multitalk.frame_source import (SourceError, TensorFrames,
                                                          VideoFileFrames)
from wanvideo_infinitetalk.multitalk.long_video import plan_long_video
from wanvideo_infinitetalk.multitalk.pipeline import generate_video
from wanvideo_infinitetalk.multitalk.reference_schedule import reference_schedule

SIZE = 64


def coded_frames(n: int, h: int = SIZE, w: int = SIZE) -> torch.Tensor:
    """Frame i is flat grey at level (i + 1) / (n + 1): its number can be read back from pixels."""
    levels = (torch.arange(n, dtype=torch.float32) + 1) / (n + 1)
    return levels[:, None, None, None].expand(n, h, w, 3).clone()


def frame_number(pixels: torch.Tensor, n: int) -> int:
    return int(round(float(pixels.float().mean()) * (n + 1) - 1))


def two_digit_frames(n: int, h: int, w: int) -> torch.Tensor:
    """Frame i shows i // 16 in red and i % 16 in green, 16 levels apart: survives H.264/MPEG-4."""
    out = torch.zeros(n, h, w, 3)
    for i in range(n):
        out[i, ..., 0], out[i, ..., 1] = (i // 16 + 0.5) / 16, (i % 16 + 0.5) / 16
    return out


def two_digit_number(pixels: torch.Tensor) -> int:
    r, g = (float(pixels[..., c].float().mean()) for c in (0, 1))
    return int(r * 16) * 16 + int(g * 16)


def write_video(path: str, frames: torch.Tensor, fps: int) -> str:
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        s.options = {"qscale": "1"}
        for f in frames:
            img = (f * 255).round().to(torch.uint8).numpy()
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode(None):
            c.mux(p)
    return path


class Spy:
    def __init__(self, model):
        self.model, self.config, self.audio_proj = model, model.config, model.audio_proj
        self.clip_seen = []

    def __call__(self, x, t, context, clip_fea=None, y=None, audio=None):
        self.clip_seen.append(float(clip_fea[0, 0, 0]))
        return self.model(x, t, context, clip_fea=clip_fea, y=y, audio=audio)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_each_window_is_conditioned_on_its_scheduled_frame(model):
    n_src, fps = 40, 30.0
    source = TensorFrames(coded_frames(n_src), fps)
    vae = StandInVAE()
    request = make_request(vae, seconds=3.0, clip=17, motion=5, steps=1)   # 75 frames, 6 windows
    plan = plan_long_video(75, clip=17, motion=5)
    schedule = reference_schedule(plan, n_src, fps, "pingpong")
    fitted = source.read(schedule.needed(), SIZE, SIZE)
    encoded = []

    def vae_encode(px):
        encoded.append(frame_number(px[0], n_src))
        return vae.encode(px)

    def clip_encode(frame):
        return torch.full((1, 257, 1280), float(frame_number(frame, n_src)))

    request.window_condition = dubbing_conditions(schedule, fitted, 17, vae_encode, clip_encode)
    spy = Spy(model)
    generate_video(spy, request, vae.encode, vae.decode)
    expected = [int(i * 12 * fps / 25) for i in range(plan.num_windows)]  # stride 12, by time
    expected = [j if j < n_src else 2 * (n_src - 1) - j for j in expected]
    assert list(schedule.frames) == expected
    assert source.decoded == schedule.needed()                     # nothing else was read
    assert [e for e in encoded if e in expected] == expected       # one VAE encode per window
    per_window = [spy.clip_seen[3 * k] for k in range(plan.num_windows)]   # 3 passes a step
    assert per_window == [float(f) for f in expected]


def test_a_frozen_end_encodes_its_frame_once(model):
    source = TensorFrames(coded_frames(3), 25.0)
    plan = plan_long_video(75, clip=17, motion=5)
    schedule = reference_schedule(plan, 3, 25.0, "freeze")
    calls = []
    cond = dubbing_conditions(schedule, source.read(schedule.needed(), SIZE, SIZE), 17,
                              lambda px: calls.append(1) or StandInVAE().encode(px), None)
    for w in plan.windows:
        cond(w)
    assert schedule.frames == (0, 2, 2, 2, 2, 2) and len(calls) == 2


def test_only_scheduled_frames_of_a_video_file_are_decoded(tmp_path):
    frames = two_digit_frames(90, 48, 64)
    path = write_video(str(tmp_path / "src.mp4"), frames, 30)
    src = VideoFileFrames(path)
    assert (src.num_frames, src.fps, src.size) == (90, 30.0, (48, 64))
    got = src.read([0, 43, 86], 32, 32)
    assert src.decoded == [0, 43, 86]
    assert [two_digit_number(got[i].float() / 255) for i in (0, 43, 86)] == [0, 43, 86]
    assert all(t.dtype == torch.uint8 and t.shape == (32, 32, 3) for t in got.values())


def test_bad_sources_are_refused_with_their_name(tmp_path):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(SourceError, match="empty.mp4"):
        VideoFileFrames(str(empty))
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(SourceError, match="junk.mp4"):
        VideoFileFrames(str(junk))
    with pytest.raises(SourceError, match="no frames"):
        TensorFrames(torch.zeros(0, 8, 8, 3), 25.0)
    with pytest.raises(SourceError, match="frame rate"):
        TensorFrames(torch.zeros(2, 8, 8, 3), 0.0)


def test_small_sources_are_upscaled_and_logged(caplog):
    import logging

    with caplog.at_level(logging.INFO):
        got = TensorFrames(coded_frames(2, 8, 8), 25.0).read([1], 64, 48)
    assert got[1].shape == (48, 64, 3) and "upscaled" in caplog.text
