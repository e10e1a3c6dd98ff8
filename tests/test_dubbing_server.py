"""Dubbing over HTTP in a real ComfyUI (CPU, tiny models): LoadVideo (a 30 fps source with its
own audio) + new speech -> InfiniteTalk Video to Video -> sampler -> SaveVideo. The MP4 has
round(seconds x 25) frames at 25 fps and the new speech as its audio; bad sources get clear
errors; a small source is upscaled and logged."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import comfy_harness as h
import demo_assets
import graph_nodes as gn
import hostile_files as hf

pytestmark = pytest.mark.comfy

EMBEDS = "dub_prompt.safetensors"


def _source_video(path: str, seconds: float, fps: int, size=(48, 64)) -> str:
    """A moving pattern at `fps`, with a tone as its own audio (which dubbing must ignore)."""
    h_, w_ = size

    def frame(i):
        x = np.broadcast_to((np.arange(w_)[None, :] + 3 * i) % w_, (h_, w_))
        return np.stack([x * 255 // w_, np.full((h_, w_), 128), 255 - x * 255 // w_],
                        -1).astype(np.uint8)

    return demo_assets.write_video(path, (frame(i) for i in range(int(seconds * fps))), fps,
                                   seconds, tone_hz=440.0)


@pytest.fixture(scope="module")
def env(comfy):
    from safetensors.torch import save_file

    if comfy.models_problem or not comfy.valid_model:
        from conftest import _skip_unless_ci

        _skip_unless_ci(comfy.models_problem or "no tiny diffusion model was written")

    inp = os.path.join(comfy.base, "input")
    _source_video(os.path.join(inp, "dub_source_30fps.mp4"), 4.0, 30)
    _source_video(os.path.join(inp, "dub_small.mp4"), 1.0, 25, size=(24, 32))
    open(os.path.join(inp, "dub_empty.mp4"), "wb").close()
    with open(os.path.join(inp, "dub_junk.mp4"), "wb") as f:
        f.write(os.urandom(5000))
    hf.float_wav(os.path.join(inp, "dub_speech.wav"), hf.speech_like(5.2))
    import av

    with av.open(os.path.join(inp, "dub_audio_only.mp4"), "w") as c:   # a "video" with no frames
        a = c.add_stream("aac", rate=16000)
        a.layout = "mono"
        f = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        f.sample_rate, f.pts = 16000, 0
        for p in list(a.encode(f)) + list(a.encode(None)):
            c.mux(p)
    g = torch.Generator().manual_seed(0)
    te = os.path.join(comfy.base, "models", "text_embeds")
    os.makedirs(te, exist_ok=True)
    save_file({"positive": torch.randn(1, 6, 4096, generator=g),
               "negative": torch.randn(1, 4, 4096, generator=g)}, os.path.join(te, EMBEDS),
              metadata={"format": "wanvideo_text_embeds", "version": "1"})
    return comfy


def graph(video="dub_source_30fps.mp4", images=False, fps=25.0, width=64, height=48,
          past_end="freeze", seed=1) -> dict:
    g = {
        "1": {"class_type": "LoadAudio", "inputs": {"audio": "dub_speech.wav"}},
        "2": {"class_type": "Wav2Vec2ModelLoader", "inputs": {"model": "tiny-wav2vec2"}},
        "3": gn.audio_embeds(["2", 0], ["1", 0]),
        "10": {"class_type": "LoadVideo", "inputs": {"file": video}},
        "11": {"class_type": "VAELoader", "inputs": {"vae_name": h.TINY_VAE_NAME}},
        "12": {"class_type": "InfiniteTalkVideoToVideo",
               "inputs": {"vae": ["11", 0], "source_video": ["10", 0], "source_fps": fps,
                          "width": width, "height": height, "clip_length": 33,
                          "motion_frames": 5, "past_end": past_end,
                          "color_reference": "source_frame_0"}},
        "13": {"class_type": "WanVideoLoadTextEmbeds", "inputs": {"embeds": EMBEDS}},
        "14": gn.model_loader("wan21_tiny_i2v.safetensors", infinitetalk=["15", 0]),
        "15": {"class_type": "InfiniteTalkModelLoader",
               "inputs": {"model": "infinitetalk_tiny_single.safetensors"}},
        "16": gn.sampler(["14", 0], ["13", 0], ["13", 1], ["12", 0], ["3", 0], ["11", 0],
                         seed=seed, color_correction=0.5),
        "17": gn.save_video(["16", 2], f"dub/out{seed}"),
    }
    if images:   # the source as an IMAGE batch (GetVideoComponents) with an explicit rate
        g["18"] = {"class_type": "GetVideoComponents", "inputs": {"video": ["10", 0]}}
        del g["12"]["inputs"]["source_video"]
        g["12"]["inputs"]["source_images"] = ["18", 0]
    return g


def _probe(path: str) -> tuple[int, float, float]:
    import av

    with av.open(path) as c:
        v = c.streams.video[0]
        fps = float(v.average_rate)
        frames = sum(1 for _ in c.decode(v))
    with av.open(path) as c:
        a = c.streams.audio[0]
        seconds = sum(f.samples for f in c.decode(a)) / a.rate
    return frames, fps, seconds


@pytest.mark.parametrize("images", [False, True])
def test_dubbing_a_30fps_video_gives_the_speech_length_at_25fps(env, images):
    entry = env.run(graph(images=images, fps=30.0, seed=3 + images), timeout=900)
    saved = h.ui_output(entry, "17")["images"][0]
    frames, fps, seconds = _probe(os.path.join(env.base, "output", saved["subfolder"],
                                               saved["filename"]))
    assert (frames, fps) == (int(round(5.2 * 25)), 25.0)
    assert abs(seconds - 5.2) < 0.07, seconds           # the new speech, not the 4 s source
    log = env.log_text()
    # 130 frames in windows of 33 with stride 28: window 3 starts at 2.24 s -> 30 fps frame 67
    assert "window 3/5 (video 2.24 s) <- source frame 67 (2.23 s)" in log
    assert "window 5/5 (video 4.48 s) <- source frame 119 (3.97 s)" in log   # frozen end


@pytest.mark.parametrize("video, words", [
    ("dub_empty.mp4", ["dub_empty.mp4", "cannot be read"]),
    ("dub_junk.mp4", ["dub_junk.mp4"]),
    ("dub_audio_only.mp4", ["dub_audio_only.mp4", "no video stream"]),
])
def test_bad_sources_are_refused_clearly(env, video, words):
    entry = env.wait(env.queue(graph(video=video)), timeout=300)
    err = h.execution_error(entry)
    assert err is not None and err["node_type"] in ("InfiniteTalkVideoToVideo", "LoadVideo"), err
    for w in words:
        assert w in err["exception_message"], err["exception_message"]


def test_fps_zero_for_images_is_refused_at_validation(env):
    with pytest.raises(h.PromptRejected) as e:
        env.queue(graph(images=True, fps=0.0))
    assert "source_fps" in str(e.value.node_errors)


def test_small_source_is_upscaled_and_logged(env):
    env.run(graph(video="dub_small.mp4", seed=9), timeout=900)
    assert "smaller than the 64x48 output; they are upscaled" in env.log_text()
