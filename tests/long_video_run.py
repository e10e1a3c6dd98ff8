"""Child process for tests/test_frame_sink.py: one long video through generate_video into an MP4
(tiny I2V + InfiniteTalk model, stand-in VAE, random audio features), then print JSON with the
peak RSS. Run: python tests/long_video_run.py SECONDS OUT.mp4 [SIZE]"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402,F401  (imports the pack as wanvideo_infinitetalk)
import torch  # noqa: E402

from test_pipeline import StandInVAE, tiny_model  # noqa: E402
from wanvideo_infinitetalk.multitalk.frame_sink import Mp4Sink  # noqa: E402
from wanvideo_infinitetalk.multitalk.pipeline import VideoRequest, generate_video  # noqa: E402


def peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM). Not ru_maxrss: after fork + exec that also
    holds the parent's peak (pytest's footprint), which would hide the difference under test."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def main(seconds: float, out: str, size: int) -> None:
    torch.manual_seed(0)
    model, vae = tiny_model(), StandInVAE()
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(size, size, 3, generator=g)
    lat = vae.encode(torch.cat([ref[None], torch.full((80, size, size, 3), 0.5)]))
    mask = torch.zeros(1, 4, lat.shape[2], *lat.shape[-2:])
    mask[:, :, 0] = 1
    frames = int(round(seconds * 25))
    request = VideoRequest(
        reference=ref, y=torch.cat([mask, lat], dim=1), clip_fea=torch.randn(1, 257, 1280, generator=g),
        positive=torch.randn(1, 7, 4096, generator=g), negative=torch.randn(1, 5, 4096, generator=g),
        features=[torch.randn(frames, 12, 768, generator=g)], steps=1, text_scale=1.0,
        audio_scale=1.0, audio_frames=frames)
    audio = {"waveform": 0.1 * torch.randn(1, 1, int(seconds * 16000), generator=g),
             "sample_rate": 16000}
    t0 = time.time()
    result = generate_video(model, request, vae.encode, vae.decode, sink=Mp4Sink(out, 25, audio))
    print(json.dumps({"frames": result.num_frames, "windows": result.plan.num_windows,
                      "seconds": time.time() - t0, "output": result.output,
                      "peak_rss_bytes": peak_rss()}))


if __name__ == "__main__":
    main(float(sys.argv[1]), sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 256)
