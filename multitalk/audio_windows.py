"""Which wav2vec frames feed which video / latent frame (docs/REFERENCE_NOTES.md §3).

wav2vec features are resampled to the video rate (25 fps), so feature frame f belongs to video
frame f. Each video frame sees the 5 feature frames f-2..f+2 (clamped to the clip's features).
The Wan VAE folds 4 video frames into one latent frame (the first latent frame holds video frame 0
alone), so the audio projection sees, per latent frame:
  latent 0:   the 5-frame window of video frame 0;
  latent k>0: 8 entries from video frames 4k-3..4k: the first frame's offsets -2..0, the two middle
              frames' offset 0, the last frame's offsets 0..+2.
Everything here is integer bookkeeping plus one gather; shapes are Python ints.
"""
from __future__ import annotations

import torch

from .long_video import FPS, audio_rows  # noqa: F401  (FPS: the video rate, one home)

WINDOW_RADIUS = 2                      # offsets -2..+2
WINDOW = 2 * WINDOW_RADIUS + 1         # 5 entries per video frame
VAE_STRIDE_T = 4                       # video frames per latent frame (after the first)
LATER_ENTRIES = WINDOW + VAE_STRIDE_T - 1  # 8 entries per later latent frame


def video_frames_for_latents(n_latent: int) -> int:
    """Video frames covered by `n_latent` latent frames (frames = 4n+1)."""
    if n_latent < 1:
        raise ValueError(f"need at least one latent frame, got {n_latent}")
    return VAE_STRIDE_T * (n_latent - 1) + 1


def latents_for_video_frames(n_video: int) -> int:
    if n_video < 1 or (n_video - 1) % VAE_STRIDE_T:
        raise ValueError(f"video frame count must be 4n+1, got {n_video}")
    return (n_video - 1) // VAE_STRIDE_T + 1


def latent_entries(n_latent: int) -> list[list[tuple[int, int]]]:
    """Per latent frame, the (video_frame, window_slot) pairs in the order the projection reads
    them; window_slot 0..4 stands for offset -2..+2."""
    mid = WINDOW_RADIUS
    out = [[(0, s) for s in range(WINDOW)]]
    for k in range(1, n_latent):
        f0 = VAE_STRIDE_T * (k - 1) + 1
        frames = list(range(f0, f0 + VAE_STRIDE_T))
        entries = [(frames[0], s) for s in range(0, mid + 1)]
        entries += [(f, mid) for f in frames[1:-1]]
        entries += [(frames[-1], s) for s in range(mid, WINDOW)]
        out.append(entries)
    return out


def reflect_pad(features: torch.Tensor, needed: int) -> torch.Tensor:
    """Extend `features` [T, ...] to at least `needed` frames by appending its last frames in
    reverse order, as the official generator does for the final short window (it appends
    `needed - T + 3` reversed frames so the +2 look-ahead of the last frame is real audio too; it
    pads as soon as the window reaches the end, `needed >= T`)."""
    total = features.shape[0]
    if total == 0:
        raise ValueError("cannot pad empty audio features")
    if needed < total:
        return features
    out = features
    while out.shape[0] < needed + WINDOW_RADIUS + 1:
        miss = min(needed - out.shape[0] + WINDOW_RADIUS + 1, out.shape[0])
        out = torch.cat([out, torch.flip(out[-miss:], dims=[0])], dim=0)
    return out


def clip_windows(features: torch.Tensor, start: int, n_frames: int) -> torch.Tensor:
    """Windowed features for one clip: `features` [T, 12, 768] of the whole audio (one speaker),
    video frames start..start+n_frames-1 -> [n_frames, 5, 12, 768], by the one audio rule
    (long_video.audio_rows: clamped to the mirrored tail, then mapped into the real rows)."""
    if start < 0 or n_frames < 1:
        raise ValueError(f"bad clip window start={start}, n_frames={n_frames}")
    if features.shape[0] == 0:
        raise ValueError("cannot window empty audio features")
    idx = torch.tensor(audio_rows(start, n_frames, features.shape[0], WINDOW_RADIUS))
    return features[idx.to(features.device)]


def latent_windows(windows: torch.Tensor, n_latent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per-video-frame windows [..., n_video, 5, C...] into the projection inputs:
    first [..., 5, C...] (latent 0) and later [..., n_latent-1, 8, C...]."""
    fdim = windows.dim() - 4  # index of the video-frame axis for [.., n_video, 5, 12, 768]
    n_video = windows.shape[fdim]
    if n_video != video_frames_for_latents(n_latent):
        raise ValueError(f"audio windows cover {n_video} video frames but {n_latent} latent frames "
                         f"need {video_frames_for_latents(n_latent)}")
    first = windows.select(fdim, 0)
    if n_latent == 1:
        later = first.new_zeros(*first.shape[:fdim], 0, LATER_ENTRIES, *first.shape[fdim + 1:])
        return first, later
    mid = WINDOW_RADIUS
    rest = windows.narrow(fdim, 1, n_video - 1)
    rest = rest.reshape(*rest.shape[:fdim], n_latent - 1, VAE_STRIDE_T, *rest.shape[fdim + 1:])
    g = fdim + 1  # frame-in-group axis; the window axis follows it
    head = rest.select(g, 0).narrow(g, 0, mid + 1)
    middle = rest.narrow(g, 1, VAE_STRIDE_T - 2).narrow(g + 1, mid, 1).flatten(g, g + 1)
    tail = rest.select(g, VAE_STRIDE_T - 1).narrow(g, mid, WINDOW - mid)
    return first, torch.cat([head, middle, tail], dim=g)
