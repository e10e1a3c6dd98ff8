"""Frame sinks: the MP4 sink writes frames and audio as windows finish (flat host memory for any
length, no file left on failure); generate_video feeds either sink the same frames."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from test_pipeline import SHORT, StandInVAE, make_request, tiny_model
from wanvideo_infinitetalk.multitalk.frame_sink import MemorySink, Mp4Sink
from wanvideo_infinitetalk.multitalk.pipeline import generate_video
from wanvideo_infinitetalk.wanvideo.sampling import SamplingCallbacks, SamplingInterrupted

HERE = os.path.dirname(os.path.abspath(__file__))


def probe(path: str) -> dict:
    """Frame count, frame rate, size and audio duration, read back with PyAV."""
    import av

    with av.open(path) as c:
        v = c.streams.video[0]
        fps, size = float(v.average_rate), (v.width, v.height)
        frames = sum(1 for _ in c.decode(v))
    with av.open(path) as c:
        a = c.streams.audio[0] if c.streams.audio else None
        samples = sum(f.samples for f in c.decode(a)) if a is not None else 0
        rate = a.rate if a is not None else None
    return {"frames": frames, "fps": fps, "size": size,
            "audio_seconds": samples / rate if rate else 0.0}


def _audio(seconds: float, rate: int = 16000) -> dict:
    g = torch.Generator().manual_seed(0)
    return {"waveform": 0.1 * torch.randn(1, 1, int(seconds * rate), generator=g),
            "sample_rate": rate}


def test_mp4_sink_writes_frames_and_audio_of_the_same_length(tmp_path):
    path = str(tmp_path / "v.mp4")
    sink = Mp4Sink(path, 25, _audio(3.0))
    sink.start(60, 32, 48)
    for start in (0, 25, 50):
        n = min(25, 60 - start)
        sink.write(torch.rand(n, 32, 48, 3), start)
    assert sink.finish() == path
    info = probe(path)
    assert info["frames"] == 60 and info["fps"] == 25.0 and info["size"] == (48, 32)
    assert abs(info["audio_seconds"] - 60 / 25) < 0.07     # one AAC frame of padding at most


def test_mp4_sink_pads_audio_shorter_than_the_video(tmp_path):
    sink = Mp4Sink(str(tmp_path / "v.mp4"), 25, _audio(0.5))
    sink.start(50, 16, 16)
    sink.write(torch.rand(50, 16, 16, 3), 0)
    info = probe(sink.finish())
    assert abs(info["audio_seconds"] - 2.0) < 0.07


def test_mp4_sink_refuses_gaps_and_incomplete_videos_and_abort_removes_the_file(tmp_path):
    path = str(tmp_path / "v.mp4")
    sink = Mp4Sink(path, 25)
    sink.start(10, 16, 16)
    with pytest.raises(ValueError, match="in order"):
        sink.write(torch.rand(2, 16, 16, 3), 3)
    sink.write(torch.rand(5, 16, 16, 3), 0)
    with pytest.raises(ValueError, match="5 of 10 frames"):
        sink.finish()
    sink.abort()
    assert not os.path.exists(path)
    with pytest.raises(ValueError, match="even"):
        Mp4Sink(str(tmp_path / "odd.mp4")).start(1, 15, 16)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_generate_video_streams_the_same_frames_it_would_keep(model, tmp_path):
    vae = StandInVAE()
    mem = generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode)
    path = str(tmp_path / "v.mp4")
    out = generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode,
                         sink=Mp4Sink(path, 25, _audio(2.0)))
    assert out.frames is None and out.output == path
    import av

    with av.open(path) as c:
        decoded = torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24"))
                               for f in c.decode(c.streams.video[0])]).float() / 255
    assert decoded.shape == mem.frames.shape
    assert (decoded - mem.frames).abs().mean() < 0.03      # H.264 at crf 19 on noise-like frames


def test_an_interrupted_stream_leaves_no_file(model, tmp_path):
    vae = StandInVAE()
    calls = []

    def stop():
        calls.append(1)
        return len(calls) > 4          # inside window 2

    path = str(tmp_path / "v.mp4")
    with pytest.raises(SamplingInterrupted):
        generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode,
                       SamplingCallbacks(should_stop=stop), sink=Mp4Sink(path, 25))
    assert not os.path.exists(path)


def _run(seconds: float, out: str, size: int) -> dict:
    # glibc keeps freed 4-32 MB blocks (a window's frames) in per-thread heaps and hands memory
    # back to the system late and unevenly; with two arenas and a 4 MB mmap threshold every
    # frame buffer is returned when freed, so RSS measures what the pipeline keeps, not what the
    # allocator caches (both runs use the same settings).
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"),
               MALLOC_ARENA_MAX="2", MALLOC_MMAP_THRESHOLD_=str(4 * 2 ** 20))
    proc = subprocess.run([sys.executable, os.path.join(HERE, "long_video_run.py"), str(seconds),
                           out, str(size)], capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(1200)
def test_three_minutes_stream_in_flat_host_memory(tmp_path):
    """180 s of audio at 192x192: kept in memory the frames alone would take 2.0 GB; streamed,
    the peak RSS stays within 1 GB of a 20 s run and the MP4 holds round(180 x 25) frames."""
    size = 192
    short = _run(20.0, str(tmp_path / "short.mp4"), size)
    long = _run(180.0, str(tmp_path / "long.mp4"), size)
    in_memory = 4500 * size * size * 3 * 4
    print(f"peak RSS 20 s {short['peak_rss_bytes'] / 1e9:.2f} GB, 180 s "
          f"{long['peak_rss_bytes'] / 1e9:.2f} GB ({long['windows']} windows, "
          f"{long['seconds']:.0f} s); the frames in memory would be {in_memory / 1e9:.2f} GB")
    assert long["frames"] == 4500
    assert long["peak_rss_bytes"] - short["peak_rss_bytes"] <= 2 ** 30
    info = probe(long["output"])
    assert info["frames"] == 4500 and info["fps"] == 25.0
    assert abs(info["audio_seconds"] - 180.0) < 0.07
