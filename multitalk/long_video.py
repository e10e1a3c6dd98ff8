"""Window planning for arbitrarily long InfiniteTalk videos (pure Python ints).

How the official generate loop walks the audio (25 fps, one audio feature row per video frame):
* window k covers audio frames [k * stride, k * stride + clip), stride = clip - motion (81 - 9 = 72);
* window 0 is conditioned on the reference image (1 motion frame -> 1 latent frame); every later
  window on the last `motion` decoded frames of the previous window (9 -> 3 latent frames);
* stitching keeps all frames of window 0 and drops the first `motion` frames of later windows,
  so window k contributes video frames [k * stride + motion, k * stride + clip);
* windows continue while the previous window ends before the target length L, i.e.
  count = 1 + ceil(max(0, L - clip) / stride);
* when the last window runs past the audio (end >= N) the features are extended by mirroring
  their tail (the official code appends flip(features[-m:]) with m = end - N + 3, the +3 covering
  the +-2 frame context the audio projection reads), and the video is trimmed to L.
* L = min(N, max_frames). The official code refuses audio of `clip` frames or fewer; here a short
  clip is planned as one full window on mirrored audio, trimmed to N (or, with
  fit_short_clip=True, as one window of the smallest 4n+1 length >= N, which costs less).
"""
from __future__ import annotations

from dataclasses import dataclass

FPS = 25              # InfiniteTalk's video rate: one audio feature row per frame
CLIP_FRAMES = 81
MOTION_FRAMES = 9
AUDIO_CONTEXT = 2  # the audio projection reads feature rows f-2 .. f+2 for video frame f


def frames_for_seconds(seconds: float, fps: int = FPS) -> int:
    """Video frames for an audio duration: round(seconds * fps) (Python rounding)."""
    return int(round(float(seconds) * fps))


def latent_frames(frames: int) -> int:
    """Latent frames of `frames` pixel frames under the Wan VAE (temporal stride 4, first frame alone)."""
    return (int(frames) - 1) // 4 + 1


def reflect_index(i: int, n: int) -> int:
    """Index into n rows of the mirrored extension rows[0..n-1], rows[n-1..0], rows[0..n-1], ..."""
    if n < 1:
        raise ValueError("cannot reflect into an empty sequence")
    m = i % (2 * n)
    return m if m < n else 2 * n - 1 - m


@dataclass(frozen=True)
class Window:
    index: int
    audio_start: int          # first audio/video frame of this window (inclusive)
    audio_end: int            # audio_start + clip (exclusive); may exceed the real audio
    motion_frames: int        # pixel frames that condition it: 1 (reference image) or `motion`
    motion_latent_frames: int  # latent frames overwritten with clean motion latents
    keep_start: int           # decoded frames [keep_start, keep_end) of this window are kept
    keep_end: int
    out_start: int            # ... and land at [out_start, out_end) of the stitched video
    out_end: int

    @property
    def frames(self) -> int:
        return self.audio_end - self.audio_start


@dataclass(frozen=True)
class LongVideoPlan:
    audio_frames: int         # N: feature rows available (video frames of the whole audio)
    total_frames: int         # length of the stitched video: min(N, max_frames)
    clip: int
    motion: int
    windows: tuple[Window, ...]
    padded_audio_frames: int  # rows after mirroring the tail (== audio_frames if none needed)

    @property
    def stride(self) -> int:
        return self.clip - self.motion

    @property
    def num_windows(self) -> int:
        return len(self.windows)

    def padded_indices(self) -> list[int]:
        """For each row of the padded feature sequence, the row of the original features."""
        return [reflect_index(i, self.audio_frames) for i in range(self.padded_audio_frames)]

    def window_audio_indices(self, window: Window, context: int = AUDIO_CONTEXT) -> list[list[int]]:
        """Per video frame of `window`, the original feature rows f-context..f+context."""
        return audio_rows(window.audio_start, window.frames, self.audio_frames, context)


def padded_length(audio_frames: int, end: int, context: int = AUDIO_CONTEXT) -> int:
    """Feature rows after the official tail mirroring for a window ending at `end` (exclusive):
    it appends end - N + context + 1 mirrored rows as soon as the window reaches the end."""
    return end + context + 1 if end >= audio_frames else audio_frames


def audio_rows(start: int, frames: int, audio_frames: int,
               context: int = AUDIO_CONTEXT) -> list[list[int]]:
    """The audio rule, in one place: for video frames start..start+frames-1 of audio with
    `audio_frames` feature rows, the original rows f-context..f+context each reads. As in the
    official loop, indices are clamped to the mirrored sequence, then mapped through it."""
    last = padded_length(audio_frames, start + frames, context) - 1
    rows = []
    for f in range(start, start + frames):
        near = (min(max(f + d, 0), last) for d in range(-context, context + 1))
        rows.append([reflect_index(j, audio_frames) for j in near])
    return rows


def _check_lengths(clip: int, motion: int) -> None:
    if clip < 5 or (clip - 1) % 4:
        raise ValueError(f"clip length must be 4n+1 and >= 5, got {clip}")
    if not 1 <= motion < clip:
        raise ValueError(f"motion frames must be in 1..{clip - 1}, got {motion}")


def plan_long_video(audio_frames: int, clip: int = CLIP_FRAMES, motion: int = MOTION_FRAMES,
                    max_frames: int | None = None, max_seconds: float | None = None,
                    fps: int = FPS, fit_short_clip: bool = False) -> LongVideoPlan:
    """Plan the windows for audio of `audio_frames` video frames (rows of audio features)."""
    n = int(audio_frames)
    clip, motion = int(clip), int(motion)
    _check_lengths(clip, motion)
    if n < 1:
        raise ValueError("the audio is empty: no video frames to generate")
    total = n
    if max_frames is not None:
        total = min(total, int(max_frames))
    if max_seconds is not None:
        total = min(total, frames_for_seconds(max_seconds, fps))
    if total < 1:
        raise ValueError(f"the frame limit leaves nothing to generate (max_frames={max_frames}, "
                         f"max_seconds={max_seconds})")
    if fit_short_clip and total < clip:
        clip = max(5, 4 * ((total - 1 + 3) // 4) + 1)
        motion = min(motion, clip - 1)

    stride = clip - motion
    count = 1 + max(0, -(-(total - clip) // stride))
    windows = []
    for k in range(count):
        start = k * stride
        first = k == 0
        m_frames = 1 if first else motion
        keep_start = 0 if first else motion
        keep_end = min(clip, total - start)
        windows.append(Window(
            index=k, audio_start=start, audio_end=start + clip,
            motion_frames=m_frames, motion_latent_frames=latent_frames(m_frames),
            keep_start=keep_start, keep_end=keep_end,
            out_start=start + keep_start, out_end=start + keep_end))
    padded = padded_length(n, windows[-1].audio_end)
    return LongVideoPlan(audio_frames=n, total_frames=total, clip=clip, motion=motion,
                         windows=tuple(windows), padded_audio_frames=padded)
