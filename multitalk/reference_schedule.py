"""Which source frame conditions which window (dubbing; image mode is "frame 0 every window").

Window k of a long video starts at output frame a_k = k * (clip - motion). In dubbing, the source
frame shown at that moment is the window's reference: it builds the window's image condition and
CLIP tokens, while motion frames still come from the previous generated window. Time maps at the
output's 25 fps: source frame floor(a_k / 25 * source_fps) (for a 25 fps source exactly a_k, the
official rule; the official code indexes raw frame numbers, so a 30 fps source played 1.2x fast).
Past the source's end:
  freeze     the last source frame (official),
  loop       from the start again,
  pingpong   backwards and forwards again (no frame repeated at the turns).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from .long_video import FPS, LongVideoPlan

PAST_END = ("freeze", "loop", "pingpong")


def source_index(timeline_frame: int, source_frames: int, source_fps: float,
                 past_end: str = "freeze", out_fps: int = FPS) -> int:
    """The source frame displayed at output frame `timeline_frame`."""
    n = int(source_frames)
    if n < 1:
        raise ValueError("the source video has no frames")
    if not (math.isfinite(source_fps) and source_fps > 0):
        raise ValueError(f"the source frame rate must be a positive number, got {source_fps}")
    if past_end not in PAST_END:
        raise ValueError(f"past_end must be one of {PAST_END}, got {past_end!r}")
    # The small epsilon keeps exact ratios (e.g. 25 -> 25 fps) from flooring one frame low.
    i = int(math.floor(int(timeline_frame) * float(source_fps) / out_fps + 1e-9))
    if i < n:
        return i
    if past_end == "freeze":
        return n - 1
    if past_end == "loop" or n == 1:
        return i % n
    period = 2 * (n - 1)
    j = i % period
    return j if j < n else period - j


@dataclass(frozen=True)
class ReferenceSchedule:
    """Per window of a plan: the source frame and its time in the source."""
    frames: tuple[int, ...]
    source_fps: float
    source_frames: int
    past_end: str

    def seconds(self, window: int) -> float:
        return self.frames[window] / self.source_fps

    def describe(self, plan: LongVideoPlan) -> list[str]:
        """One line per window, for the log."""
        return [f"window {w.index + 1}/{plan.num_windows} (video {w.audio_start / FPS:.2f} s) <- "
                f"source frame {f} ({f / self.source_fps:.2f} s)"
                for w, f in zip(plan.windows, self.frames)]

    def needed(self) -> list[int]:
        """The distinct source frames to decode, in order."""
        return sorted(set(self.frames))


def reference_schedule(plan: LongVideoPlan, source_frames: int, source_fps: float,
                       past_end: str = "freeze") -> ReferenceSchedule:
    frames = tuple(source_index(w.audio_start, source_frames, source_fps, past_end, FPS)
                   for w in plan.windows)
    return ReferenceSchedule(frames, float(source_fps), int(source_frames), past_end)


def image_schedule(plan: LongVideoPlan) -> ReferenceSchedule:
    """Image mode: the one portrait conditions every window."""
    return ReferenceSchedule(tuple(0 for _ in plan.windows), float(FPS), 1, "freeze")


def added_frames(plan: LongVideoPlan) -> Sequence[tuple[int, int]]:
    """The output frame range each window adds, [out_start, out_end)."""
    return [(w.out_start, w.out_end) for w in plan.windows]
