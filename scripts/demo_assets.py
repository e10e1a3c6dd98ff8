"""Inputs of the tiny demo workflow (example_workflows/infinitetalk_tiny_demo.json) for a ComfyUI
base directory: a synthetic portrait and a spoken WAV in input/, cached text embeddings in
models/text_embeds. The tiny models themselves come from comfy_harness.prepare_base.

Used by scripts/demo.py, scripts/make_workflows.py and tests/test_workflows_server.py; no pytest
and no ComfyUI import here.
"""
from __future__ import annotations

import math
import os
import shutil
import struct
import subprocess
import wave

PORTRAIT = "infinitetalk_demo_portrait.png"
SPEECH = "infinitetalk_demo_speech.wav"
EMBEDS = "infinitetalk_demo_prompt.safetensors"
SENTENCE = "Hello! I am a tiny talking portrait, made inside Comfy U I."
# Inputs the real-model example workflows name; placed by tests so LoadImage/LoadAudio validate.
REAL_INPUTS = {"image": "portrait.png", "audio": "speech.wav", "audio_2": "speech_2.wav",
               "mask_1": "speaker_1_mask.png", "mask_2": "speaker_2_mask.png",
               "video": "dubbing_source.mp4"}


def write_portrait(path: str, size: int = 256) -> str:
    """A face-like picture drawn with PIL: background, hair, face, eyes, nose, mouth."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (size, size))
    d = ImageDraw.Draw(img)
    for y in range(size):  # vertical gradient backdrop
        t = y / size
        d.line([(0, y), (size, y)], fill=(int(70 + 60 * t), int(110 + 50 * t), int(160 - 40 * t)))
    s = size / 256
    box = lambda *v: [int(x * s) for x in v]  # noqa: E731
    d.ellipse(box(48, 30, 208, 200), fill=(60, 40, 30))             # hair
    d.rectangle(box(70, 170, 186, 256), fill=(40, 60, 120))          # shirt
    d.rectangle(box(112, 160, 144, 200), fill=(225, 180, 150))       # neck
    d.ellipse(box(68, 52, 188, 196), fill=(235, 190, 160))           # face
    for x in (98, 140):
        d.ellipse(box(x, 104, x + 20, 118), fill=(255, 255, 255))    # eyes
        d.ellipse(box(x + 6, 106, x + 14, 116), fill=(50, 80, 40))
        d.line(box(x - 2, 96, x + 22, 94), fill=(60, 40, 30), width=max(1, int(3 * s)))
    d.polygon(box(128, 118, 121, 146, 135, 146), fill=(215, 160, 135))  # nose
    d.chord(box(106, 152, 150, 178), 0, 180, fill=(170, 60, 70))     # mouth
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)
    return path


def write_mask(path: str, left: float, right: float, size: int = 256) -> str:
    """A white-on-black mask image covering the horizontal span [left, right) of the frame."""
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size), 0)
    ImageDraw.Draw(img).rectangle([int(left * size), 0, int(right * size) - 1, size - 1], fill=255)
    img.save(path)
    return path


def wav_seconds(path: str) -> float:
    with wave.open(path) as w:
        return w.getnframes() / w.getframerate()


def tone_wav(path: str, seconds: float, rate: int = 16000) -> None:
    """Speech-like stand-in (syllable-rate amplitude modulation) when espeak-ng is missing."""
    n = int(seconds * rate)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(b"".join(
            struct.pack("<h", int(9000 * math.sin(2 * math.pi * 180 * i / rate)
                                  * max(0.0, math.sin(2 * math.pi * 4 * i / rate))))
            for i in range(n)))


def write_speech(path: str, text: str = SENTENCE, max_seconds: float = 4.0) -> str:
    """Speak `text` with espeak-ng into a WAV of at most `max_seconds` (speed adjusted to fit);
    falls back to a modulated tone of 3.5 s without espeak-ng."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        tone_wav(path, 3.5)
        return path
    for speed in (175, 200, 230, 260, 300):
        subprocess.run([espeak, "-s", str(speed), "-w", path, text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if wav_seconds(path) <= max_seconds:
            break
    return path


def write_text_embeds(path: str, seed: int = 0) -> str:
    """Cached umT5-shaped prompt embeddings (random: the tiny model has no real text encoder)."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({"positive": (0.1 * torch.randn(1, 8, 4096, generator=g)).contiguous(),
               "negative": (0.1 * torch.randn(1, 6, 4096, generator=g)).contiguous()}, path,
              metadata={"format": "wanvideo_text_embeds", "version": "1",
                        "prompts": '{"positive": "random stand-in for the tiny demo"}'})
    return path


def prepare_demo_inputs(base: str) -> dict[str, str]:
    """Portrait, speech and text embeds of the tiny demo in BASE (tiny models not included)."""
    base = os.path.abspath(base)
    inp = os.path.join(base, "input")
    out = {"portrait": os.path.join(inp, PORTRAIT), "speech": os.path.join(inp, SPEECH),
           "embeds": os.path.join(base, "models", "text_embeds", EMBEDS)}
    write_portrait(out["portrait"])
    write_speech(out["speech"])
    write_text_embeds(out["embeds"])
    return out


def prepare_real_inputs(base: str) -> dict[str, str]:
    """The input files the real-model example workflows name (portrait, two speeches, two masks),
    so that LoadImage / LoadAudio / LoadImageMask validate on a test server."""
    inp = os.path.join(os.path.abspath(base), "input")
    os.makedirs(inp, exist_ok=True)
    out = {k: os.path.join(inp, v) for k, v in REAL_INPUTS.items()}
    write_portrait(out["image"])
    write_speech(out["audio"], "Hello there.")
    write_speech(out["audio_2"], "Hi, nice to meet you.")
    write_mask(out["mask_1"], 0.0, 0.5)
    write_mask(out["mask_2"], 0.5, 1.0)
    write_source_video(out["video"], out["image"])
    return out


def write_video(path: str, frames, fps: int, tone_seconds: float, tone_hz: float = 330.0) -> str:
    """An MP4 of `frames` (uint8 [H, W, 3] arrays, even sizes) at `fps` with a tone of its own as
    audio: a source for dubbing, whose audio must be ignored. Written by the pack's own MP4 sink."""
    import numpy as np
    import torch

    from comfy_harness import load_pack

    load_pack()
    from wanvideo_infinitetalk.multitalk.frame_sink import Mp4Sink

    pixels = torch.from_numpy(np.stack(list(frames))).float() / 255
    t = torch.arange(int(tone_seconds * 16000)) / 16000
    tone = {"waveform": (0.2 * torch.sin(2 * np.pi * tone_hz * t)).reshape(1, 1, -1),
            "sample_rate": 16000}
    sink = Mp4Sink(path, fps, tone)
    sink.start(pixels.shape[0], pixels.shape[1], pixels.shape[2])
    sink.write(pixels, 0)
    return sink.finish()


def write_source_video(path: str, portrait: str, seconds: float = 3.0, fps: int = 30) -> str:
    """A video to dub: the portrait panning slowly at 30 fps, with a tone as its own audio."""
    import numpy as np
    from PIL import Image

    img = np.asarray(Image.open(portrait).convert("RGB"))
    h, w = img.shape[0] - img.shape[0] % 16, img.shape[1] - 16 - img.shape[1] % 16
    n = int(seconds * fps)
    frames = (img[:h, dx:dx + w] for dx in
              (int(8 + 8 * math.sin(2 * math.pi * i / n)) for i in range(n)))
    return write_video(path, frames, fps, seconds)
