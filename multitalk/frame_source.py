"""Source videos for dubbing, read lazily: only the frames a schedule names are decoded and kept,
already fitted to the output size as uint8 (a 10-minute source never sits in RAM as a float
batch; 84 windows of 832x480 keep about 100 MB).
"""
from __future__ import annotations

import io
import logging
import math
import os
from typing import Sequence

import torch

from .framing import fit_image

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """A source video that cannot be used; the message names it and the problem."""


def _to_uint8(frame: torch.Tensor) -> torch.Tensor:
    return (frame.clamp(0, 1) * 255).round().to(torch.uint8)


def _fit(frame: torch.Tensor, width: int, height: int, label: str, warned: list) -> torch.Tensor:
    if not warned and (frame.shape[0] < height or frame.shape[1] < width):
        warned.append(1)
        log.info("%s: source frames are %dx%d, smaller than the %dx%d output; they are upscaled",
                 label, frame.shape[1], frame.shape[0], width, height)
    return _to_uint8(fit_image(frame, width, height))


class FrameSource:
    """num_frames, fps, size (height, width) and read(indices, width, height) -> {index: uint8
    [height, width, 3]} (scaled to cover, centre-cropped), plus `decoded`: the indices read."""

    label = "source video"
    num_frames: int
    fps: float
    size: tuple[int, int]

    def read(self, indices: Sequence[int], width: int, height: int) -> dict[int, torch.Tensor]:
        raise NotImplementedError


class TensorFrames(FrameSource):
    """An IMAGE batch [N, H, W, C] 0..1 already in memory, with its frame rate."""

    def __init__(self, images: torch.Tensor, fps: float, label: str = "source_images"):
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] < 3:
            raise SourceError(f"{label}: expected an IMAGE batch [frames, height, width, 3], got "
                              f"{tuple(getattr(images, 'shape', ())) or type(images).__name__}")
        if images.shape[0] < 1:
            raise SourceError(f"{label}: the batch holds no frames")
        _check_fps(fps, label)
        self.images, self.fps, self.label = images, float(fps), label
        self.num_frames = int(images.shape[0])
        self.size = (int(images.shape[1]), int(images.shape[2]))
        self.decoded: list[int] = []

    def read(self, indices, width, height):
        warned: list = []
        out = {}
        for i in sorted(set(int(i) for i in indices)):
            out[i] = _fit(self.images[i, ..., :3].float(), width, height, self.label, warned)
            self.decoded.append(i)
        return out


def _check_fps(fps, label: str) -> None:
    try:
        ok = math.isfinite(float(fps)) and float(fps) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise SourceError(f"{label}: the frame rate must be a positive number, got {fps}")


class VideoFileFrames(FrameSource):
    """A video file (path or in-memory bytes) decoded with PyAV, frames numbered in decode order
    (as the official reader numbers them). The frame count comes from the container, or from one
    pass over its packets (no decoding) when the container does not say."""

    def __init__(self, source, label: str = "source_video"):
        self.source, self.label = source, label
        self.decoded: list[int] = []
        try:
            self.fps, self.num_frames, self.size = self._probe()
        except SourceError:
            raise
        except Exception as exc:   # PyAV raises many types for unreadable or truncated input
            raise SourceError(f"{label}: {self.name} cannot be read as a video ({exc})") from None
        if self.num_frames < 1:
            raise SourceError(f"{label}: {self.name} holds no video frames")

    @property
    def name(self) -> str:
        return os.path.basename(self.source) if isinstance(self.source, str) else "the video"

    def _open(self):
        import av

        if isinstance(self.source, io.BytesIO):
            self.source.seek(0)
        return av.open(self.source, mode="r")

    def _probe(self):
        with self._open() as c:
            if not c.streams.video:
                raise SourceError(f"{self.label}: {self.name} has no video stream")
            v = c.streams.video[0]
            rate = v.average_rate or v.guessed_rate or v.base_rate
            fps = float(rate) if rate else 0.0
            _check_fps(fps, f"{self.label} ({self.name})")
            size = (int(v.codec_context.height), int(v.codec_context.width))
            frames = int(v.frames or 0)
            if frames <= 0:
                frames = sum(1 for p in c.demux(v) if p.size)
        return fps, frames, size

    def _fitted(self, frame, width, height, warned) -> torch.Tensor:
        rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).float() / 255
        return _fit(rgb, width, height, self.label, warned)

    def read(self, indices, width, height):
        wanted = sorted(set(int(i) for i in indices))
        if not wanted:
            return {}
        if wanted[-1] >= self.num_frames or wanted[0] < 0:
            raise SourceError(f"{self.label}: frame {wanted[-1]} asked of {self.num_frames}")
        out, warned, todo, prev = {}, [], set(wanted), None
        try:
            with self._open() as c:
                for i, frame in enumerate(c.decode(c.streams.video[0])):
                    prev = frame
                    if i in todo:
                        out[i] = self._fitted(frame, width, height, warned)
                        self.decoded.append(i)
                        todo.discard(i)
                    if not todo:
                        break
                if todo and prev is not None:   # containers may announce more than they hold
                    log.warning("%s: %s ended before frame %d (it announced %d); its last frame "
                                "stands in", self.label, self.name, min(todo), self.num_frames)
                    last = self._fitted(prev, width, height, warned)
                    out.update({i: last for i in todo})
        except Exception as exc:
            raise SourceError(f"{self.label}: {self.name} failed to decode ({exc})") from None
        if prev is None:
            raise SourceError(f"{self.label}: {self.name} decoded no frames")
        return out
