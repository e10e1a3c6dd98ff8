"""Where finished frames go, window by window: a host buffer (short videos, ComfyUI IMAGE) or an
MP4 file written as the windows complete (any length in flat host memory).

The window loop only calls `start`, `write` (frames in order, each window's kept frames) and
`finish` / `abort`; it does not know which sink it has.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Optional

import numpy as np
import torch


class FrameSink:
    """Interface: start(total_frames, height, width); write(frames [N, H, W, 3] 0..1, start)
    with consecutive starts; finish() -> the result; abort() on failure or interrupt."""

    def start(self, total_frames: int, height: int, width: int) -> None:
        raise NotImplementedError

    def write(self, frames: torch.Tensor, start: int) -> None:
        raise NotImplementedError

    def finish(self):
        raise NotImplementedError

    def abort(self) -> None:
        pass


class MemorySink(FrameSink):
    """The whole video in one host tensor, allocated once (device memory never grows)."""

    def __init__(self, dtype: torch.dtype = torch.float32):
        self.dtype, self.video = dtype, None

    def start(self, total_frames: int, height: int, width: int) -> None:
        self.video = torch.empty((total_frames, height, width, 3), dtype=self.dtype)

    def write(self, frames: torch.Tensor, start: int) -> None:
        self.video[start:start + frames.shape[0]] = frames.to("cpu", self.dtype)

    def finish(self) -> torch.Tensor:
        return self.video

    def abort(self) -> None:
        self.video = None


class Mp4Sink(FrameSink):
    """H.264 video (yuv420p, `fps`) plus, when given, AAC audio cut to the video's length, muxed
    as each window arrives. A failed or interrupted video leaves no file behind."""

    def __init__(self, path: str, fps: int = 25, audio: Optional[dict] = None, crf: int = 19):
        self.path, self.fps, self.crf = path, int(fps), int(crf)
        self.audio = audio
        self.container = self.video_stream = self.audio_stream = None
        self.frames_written = 0
        self._audio_pts = 0
        self.first_frame: Optional[torch.Tensor] = None

    def start(self, total_frames: int, height: int, width: int) -> None:
        import av

        if height % 2 or width % 2:
            raise ValueError(f"H.264 needs an even frame size, got {width}x{height}")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self.total = int(total_frames)
        self.container = av.open(self.path, mode="w", format="mp4")
        vs = self.container.add_stream("libx264" if "libx264" in av.codecs_available else "h264",
                                       rate=Fraction(self.fps, 1))
        vs.width, vs.height, vs.pix_fmt = int(width), int(height), "yuv420p"
        vs.options = {"crf": str(self.crf)}
        self.video_stream = vs
        if self.audio is not None:
            rate = int(self.audio["sample_rate"])
            self.audio_stream = self.container.add_stream("aac", rate=rate)
            self.audio_stream.layout = "mono" if self._channels() == 1 else "stereo"

    def _channels(self) -> int:
        return min(2, int(self.audio["waveform"].shape[-2]))

    def write(self, frames: torch.Tensor, start: int) -> None:
        import av

        if start != self.frames_written:
            raise ValueError(f"frames must arrive in order: expected frame {self.frames_written}, "
                             f"got {start}")
        pixels = (frames.float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        if self.first_frame is None:
            self.first_frame = frames[:1].float().cpu().clone()
        for image in pixels:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            for packet in self.video_stream.encode(frame):
                self.container.mux(packet)
        self.frames_written += int(frames.shape[0])
        self._write_audio_until(self.frames_written)

    def _write_audio_until(self, frame: int) -> None:
        """Audio up to the end of video frame `frame` (zero-padded past the audio's end)."""
        import av

        if self.audio_stream is None:
            return
        rate = int(self.audio["sample_rate"])
        end = int(round(frame / self.fps * rate))
        if end <= self._audio_pts:
            return
        wave = self.audio["waveform"][0, :self._channels()].float()
        chunk = wave[:, self._audio_pts:end]
        if chunk.shape[1] < end - self._audio_pts:
            chunk = torch.nn.functional.pad(chunk, (0, end - self._audio_pts - chunk.shape[1]))
        block = 1024   # AAC frame size
        for i in range(0, chunk.shape[1], block):
            part = chunk[:, i:i + block].contiguous().numpy()
            af = av.AudioFrame.from_ndarray(part, format="fltp", layout=self.audio_stream.layout.name)
            af.sample_rate, af.pts = rate, self._audio_pts + i
            for packet in self.audio_stream.encode(af):
                self.container.mux(packet)
        self._audio_pts = end

    def finish(self) -> str:
        if self.frames_written != self.total:
            raise ValueError(f"{os.path.basename(self.path)}: {self.frames_written} of "
                             f"{self.total} frames were written")
        for stream in (self.video_stream, self.audio_stream):
            if stream is not None:
                for packet in stream.encode(None):
                    self.container.mux(packet)
        self.container.close()
        self.container = None
        return self.path

    def abort(self) -> None:
        if self.container is not None:
            try:
                self.container.close()
            except Exception:   # the file is deleted next; a broken close changes nothing
                pass
            self.container = None
        if os.path.exists(self.path):
            os.remove(self.path)
