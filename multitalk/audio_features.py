"""Speech -> wav2vec features at the video rate, the exact InfiniteTalk recipe (docs/REFERENCE_NOTES.md §3):

mono, 16 kHz (soxr, a real band-limited resampler), loudness -23 LUFS (BS.1770; skipped when the
loudness is not finite, e.g. silence), zero-mean unit-variance over the clip, wav2vec2 in fp32,
conv features linearly interpolated (align_corners=True) to int(seconds*25) frames BEFORE the
feature projection and transformer, outputs of layers 1..12 stacked -> [T, 12, 768].
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F

from ..wanvideo.checkpoint import all_finite
from .audio_windows import FPS
from .wav2vec2 import DEFAULT_CHUNKING, Chunking

SAMPLE_RATE = 16000
TARGET_LUFS = -23.0
MIN_SAMPLES = SAMPLE_RATE // FPS  # one video frame: 640 samples, 0.04 s


def to_mono(waveform, sample_rate: int | None = None) -> np.ndarray:
    """[N], [C, N] or [1, C, N] (ComfyUI AUDIO) -> float64 [N]; channels are averaged. NaN/Inf
    samples are refused (`sample_rate` lets the message say where, in seconds)."""
    x = waveform.detach().cpu().double().numpy() if isinstance(waveform, torch.Tensor) \
        else np.asarray(waveform, dtype=np.float64)
    if x.ndim == 3:
        if x.shape[0] != 1:
            raise ValueError(f"expected one audio clip, got a batch of {x.shape[0]}")
        x = x[0]
    if x.ndim not in (1, 2):
        raise ValueError(f"audio must be [samples], [channels, samples] or [1, channels, samples], "
                         f"got shape {tuple(x.shape)}")
    bad = ~np.isfinite(x)
    if bad.any():
        bad = bad.any(axis=0) if x.ndim == 2 else bad
        first = int(np.argmax(bad))
        where = f"{first / sample_rate:.2f} s" if sample_rate else f"sample {first}"
        raise ValueError(f"audio has {int(bad.sum())} NaN/Inf samples (first at {where}); "
                         "the file is corrupt or was decoded wrongly")
    return x.mean(axis=0) if x.ndim == 2 else x


def resample(x: np.ndarray, sample_rate: int) -> np.ndarray:
    if sample_rate == SAMPLE_RATE:
        return x
    import soxr
    return soxr.resample(x, int(sample_rate), SAMPLE_RATE, quality="HQ")


def loudness_normalize(x: np.ndarray, sample_rate: int = SAMPLE_RATE,
                       target: float = TARGET_LUFS) -> tuple[np.ndarray, bool]:
    """(audio at `target` LUFS, True) or (audio unchanged, False) when the loudness cannot be
    measured: silence (-inf; the official code skips |loudness| > 100) or clips shorter than one
    400 ms BS.1770 block."""
    import pyloudnorm as pyln
    meter = pyln.Meter(sample_rate)
    if x.shape[0] < int(meter.block_size * sample_rate):
        return x, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loudness = meter.integrated_loudness(x)
        if not np.isfinite(loudness) or abs(loudness) > 100:
            return x, False
        return pyln.normalize.loudness(x, loudness, target), True


def prepare_speech(waveform, sample_rate: int) -> np.ndarray:
    """Any speech input -> mono 16 kHz float32 at -23 LUFS (one speaker's track)."""
    x = resample(to_mono(waveform, sample_rate), sample_rate)
    check_length(x.shape[0])
    return loudness_normalize(x)[0].astype(np.float32)


def check_length(samples: int) -> int:
    """Video frames covered by `samples` at 16 kHz; raises when not even one."""
    frames = int(samples / SAMPLE_RATE * FPS)
    if frames < 1:
        raise ValueError(f"audio is {samples / SAMPLE_RATE:.4f} s ({samples} samples at 16 kHz); "
                         f"at least one video frame is needed: {1 / FPS:.2f} s ({MIN_SAMPLES} samples)")
    return frames


def normalize(x: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (as Wav2Vec2FeatureExtractor with do_normalize)."""
    x = x.astype(np.float32)
    return (x - x.mean()) / np.sqrt(x.var() + 1e-7)


@torch.no_grad()
def wav2vec_features(encoder, speech: np.ndarray, device=None, n_frames: int | None = None,
                     chunking: Chunking = DEFAULT_CHUNKING) -> torch.Tensor:
    """Prepared 16 kHz speech -> [T, layers, hidden] fp32 on the CPU, T = int(seconds*25)
    unless `n_frames` overrides it (tests use the conv frame count). `chunking` bounds the
    encoder's memory on long clips without changing the features."""
    n = check_length(speech.shape[0]) if n_frames is None else int(n_frames)
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    wave = torch.from_numpy(normalize(speech)).to(device=device, dtype=torch.float32)[None]
    feats = encoder.conv_features(wave, chunking)                       # [1, T_conv, 512]
    del wave
    feats = F.interpolate(feats.transpose(1, 2), size=n, mode="linear",
                          align_corners=True).transpose(1, 2)
    cfg = encoder.config
    out = torch.empty(1, n, cfg.num_hidden_layers, cfg.hidden_size)
    encoder.layer_outputs(feats, chunking, out=out)
    check_finite_features(out[0], getattr(encoder, "source", "wav2vec2"))
    return out[0]


def check_finite_features(feats: torch.Tensor, source: str) -> None:
    """Finite speech gives finite features unless the encoder's weights are broken."""
    if all_finite(feats):
        return
    bad = ~torch.isfinite(feats)
    first = int(bad.flatten(1).any(dim=1).nonzero()[0])
    raise ValueError(f"{source}: wav2vec2 features have {int(bad.sum())} NaN/Inf values (first at "
                     f"frame {first}, {first / FPS:.2f} s); the encoder's weights are broken")


def audio_features(encoder, waveform, sample_rate: int, device=None) -> torch.Tensor:
    """One speaker's audio (any rate, mono or stereo) -> [T, layers, hidden]."""
    return wav2vec_features(encoder, prepare_speech(waveform, sample_rate), device)
