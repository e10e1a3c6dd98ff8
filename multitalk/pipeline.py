"""The long-video driver: reference image + speech features -> talking video of any length.

    result = generate_video(model, request, vae_encode, vae_decode, callbacks)

It walks the windows of `long_video.plan_long_video` (REFERENCE §4). Per window:
  1. audio: each speaker's wav2vec rows for the window's frames (f-2..f+2 per frame, the tail
     mirrored past the end of the audio) -> AudioInput;
  2. motion latents: window 0 the encoded reference (1 latent frame), later windows the VAE
     encoding of the previous window's last `motion` colour-corrected frames (3 latent frames);
     `wanvideo.sampling.sample_window` writes them, clean, before every model call;
  3. noise from `make_noise(seed + window index)` (CPU generator: same on every device);
  4. the guidance passes (cond = positive text + audio, no_text = negative text + audio,
     no_audio / uncond = positive / negative text + silent audio), t = sigma * 1000;
  5. decode, colour-correct towards the reference, keep the plan's frames and copy them to a
     host buffer allocated once for the whole video, so device memory does not grow with length.
The video is trimmed to the audio length (or max_frames); `num_frames / fps` seconds of audio
belong to it.

The VAE is the caller's (ComfyUI's in the node): `vae_encode(frames [F, H, W, 3] 0..1) ->
latents [1, 16, F_lat, h, w]` and `vae_decode(latents) -> frames [F, H, W, 3] 0..1`, both in the
model's normalised latent space. No ComfyUI import here.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch

from ..wanvideo.guidance import Guidance, PassSpec
from ..wanvideo.sampling import SamplingCallbacks, make_noise, sample_window
from ..wanvideo.schedules import flow_sigmas
from ..wanvideo.solvers import SOLVERS
from .audio_proj import AudioInput
from .audio_windows import reflect_pad
from .color import match_colors
from .long_video import CLIP_FRAMES, FPS, MOTION_FRAMES, LongVideoPlan, Window, plan_long_video

log = logging.getLogger(__name__)

VaeEncode = Callable[[torch.Tensor], torch.Tensor]
VaeDecode = Callable[[torch.Tensor], torch.Tensor]
LATENT_CHANNELS = 16
MASK_CHANNELS = 4
SEED_MASK = 2 ** 63 - 1


@dataclass
class VideoRequest:
    """Everything one generation needs besides the model and the VAE.

    reference: [H, W, 3] 0..1, already resized/cropped to the output size.
    y: [1, 20, F_lat, h, w] for `clip_frames` frames (condition_y of condition_frames): 4 mask
       channels (1 on latent frame 0) + the latents of the reference and clip_frames - 1 grey
       frames.
    clip_fea: [1, 257, 1280] CLIP vision tokens of the reference (penultimate layer).
    positive / negative: umT5 contexts [1, L, 4096].
    features: per speaker wav2vec features [T, 12, 768] (1 or 2 speakers, same T; 25 rows/s).
    masks: [2, H, W] speaker masks (two speakers only).
    reference_latent: [1, 16, 1, h, w] motion latent of window 0; default: y's latent frame 0
       (the causal VAE encodes frame 0 alone, so that IS the encoded reference).
    max_frames: None or <= 0 -> the whole audio.
    """

    reference: torch.Tensor
    y: torch.Tensor
    clip_fea: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    features: Sequence[torch.Tensor]
    masks: Optional[torch.Tensor] = None
    reference_latent: Optional[torch.Tensor] = None
    steps: int = 40
    shift: float = 7.0
    text_scale: float = 5.0
    audio_scale: float = 4.0
    solver: str = "euler"
    seed: int = 0
    color_strength: float = 0.0
    clip_frames: int = CLIP_FRAMES
    motion_frames: int = MOTION_FRAMES
    max_frames: Optional[int] = None
    fps: int = FPS
    device: torch.device | str = "cpu"
    host_dtype: torch.dtype = torch.float32
    audio_frames: Optional[int] = None  # video length for the whole audio; default: feature rows


@dataclass
class VideoResult:
    frames: torch.Tensor          # [N, H, W, 3] on the host, 0..1
    num_frames: int
    fps: int
    plan: LongVideoPlan
    window_log: list = field(default_factory=list)  # per window: dict of frame ranges and timings

    @property
    def seconds(self) -> float:
        return self.num_frames / self.fps


def validate_size(width: int, height: int, clip_frames: int, motion_frames: int) -> None:
    """The output geometry the model and the VAE accept; raises ValueError with the fix."""
    for name, v in (("width", width), ("height", height)):
        if int(v) < 16 or int(v) % 16:
            raise ValueError(f"{name} must be a positive multiple of 16 (VAE stride 8 x patch 2), "
                             f"got {v}")
    if int(clip_frames) < 5 or (int(clip_frames) - 1) % 4:
        raise ValueError(f"clip length must be 4n+1 frames (5, 9, ..., 81), got {clip_frames}")
    if not 1 <= int(motion_frames) < int(clip_frames):
        raise ValueError(f"motion frames must be in 1..{int(clip_frames) - 1}, got {motion_frames}")


def fit_image(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, 3] (or [1, H, W, C]) 0..1 -> [height, width, 3]: scale to cover, centre-crop."""
    img = image[0] if image.ndim == 4 else image
    img = img[..., :3].float()
    src_h, src_w = int(img.shape[0]), int(img.shape[1])
    scale = max(width / src_w, height / src_h)
    new_h, new_w = max(height, round(src_h * scale)), max(width, round(src_w * scale))
    x = img.permute(2, 0, 1).unsqueeze(0)
    if (new_h, new_w) != (src_h, src_w):
        x = torch.nn.functional.interpolate(x, size=(new_h, new_w), mode="bicubic",
                                            align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    x = x[:, :, top:top + height, left:left + width]
    return x[0].permute(1, 2, 0).clamp(0.0, 1.0).contiguous()


def condition_frames(reference: torch.Tensor, clip_frames: int) -> torch.Tensor:
    """The pixels the y latents encode: the reference then clip_frames - 1 grey frames (0.5 in
    0..1, i.e. the zeros of the official [-1, 1] tensor)."""
    rest = torch.full((int(clip_frames) - 1, *reference.shape), 0.5, dtype=reference.dtype)
    return torch.cat([reference.unsqueeze(0), rest.to(reference.device)], dim=0)


def condition_y(latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [1, 16, F_lat, h, w] of condition_frames -> y [1, 20, F_lat, h, w]."""
    if latents.ndim != 5 or latents.shape[:2] != (1, LATENT_CHANNELS):
        raise ValueError(f"expected latents [1, 16, F_lat, h, w], got {tuple(latents.shape)}")
    mask = torch.zeros((1, MASK_CHANNELS, *latents.shape[2:]), dtype=latents.dtype,
                       device=latents.device)
    mask[:, :, 0] = 1.0
    return torch.cat([mask, latents], dim=1)


def _check(request: VideoRequest) -> None:
    r = request
    if r.solver not in SOLVERS:
        raise ValueError(f"unknown solver {r.solver!r}; expected one of {SOLVERS}")
    if int(r.steps) < 1:
        raise ValueError(f"steps must be >= 1, got {r.steps}")
    if r.reference.ndim != 3 or r.reference.shape[-1] != 3:
        raise ValueError(f"reference must be [H, W, 3], got {tuple(r.reference.shape)}")
    if r.y.ndim != 5 or r.y.shape[:2] != (1, MASK_CHANNELS + LATENT_CHANNELS):
        raise ValueError(f"y must be [1, 20, F_lat, h, w], got {tuple(r.y.shape)}")
    want = (int(r.clip_frames) - 1) // 4 + 1
    if r.y.shape[2] != want:
        raise ValueError(f"y has {r.y.shape[2]} latent frames but a clip of {r.clip_frames} "
                         f"frames needs {want}; build the conditioning with the same clip length")
    if not 1 <= len(r.features) <= 2:
        raise ValueError(f"one or two speakers' features expected, got {len(r.features)}")
    lengths = {int(f.shape[0]) for f in r.features}
    if len(lengths) != 1:
        raise ValueError(f"speakers' features differ in length {sorted(lengths)}; pad them to "
                         "the same length (multitalk.speakers.combine_tracks)")
    for f in r.features:
        if f.ndim != 3:
            raise ValueError(f"audio features must be [T, 12, 768], got {tuple(f.shape)}")


def window_audio(plan: LongVideoPlan, window: Window, features: Sequence[torch.Tensor],
                 masks: Optional[torch.Tensor]) -> AudioInput:
    """The window's per-frame audio windows for every speaker -> AudioInput [n_spk, clip, 5, ...]."""
    idx = torch.tensor(plan.window_audio_indices(window), dtype=torch.long)
    stacked = torch.stack([f[idx.to(f.device)] for f in features])
    return AudioInput(stacked, masks=masks if len(features) == 2 else None)


def _streamer_stats(model) -> str:
    streamer = getattr(model, "block_streamer", None)
    stats = getattr(streamer, "stats", None)
    if not callable(stats):
        return ""
    s = stats()
    return (f"; BlockSwap {s.get('blocks_swapped', '?')} blocks, "
            f"{s.get('bytes_moved', 0) / 1e9:.2f} GB moved, copy {s.get('copy_ms', 0.0):.0f} ms, "
            f"waited {s.get('wait_ms', 0.0):.0f} ms, peak VRAM {s.get('peak_vram_bytes', 0) / 1e9:.2f} GB")


def _make_model_fn(model, request: VideoRequest, audio: AudioInput, silent: AudioInput, device):
    pos = request.positive.to(device)
    neg = request.negative.to(device)
    clip_fea = request.clip_fea.to(device)
    y = request.y.to(device)

    def model_fn(x: torch.Tensor, t: float, spec: PassSpec) -> torch.Tensor:
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        with torch.no_grad():
            out = model(x, tt, neg if spec.negative_text else pos, clip_fea=clip_fea, y=y,
                        audio=audio if spec.audio else silent)
        return out.float()

    return model_fn


def fit_length(features: torch.Tensor, frames: int) -> torch.Tensor:
    """Features with exactly `frames` rows. The wav2vec recipe yields int(seconds*25) rows while
    the video has round(seconds*25) frames: at most one row differs, filled by reflection."""
    if features.shape[0] >= frames:
        return features[:frames]
    return reflect_pad(features, frames)[:frames]


def generate_video(model, request: VideoRequest, vae_encode: VaeEncode, vae_decode: VaeDecode,
                   callbacks: Optional[SamplingCallbacks] = None) -> VideoResult:
    """Generate the whole video; see the module docstring. Raises SamplingInterrupted when
    callbacks.should_stop() turns True (checked before every model call)."""
    _check(request)
    r, cb = request, callbacks or SamplingCallbacks()
    device = torch.device(r.device)
    max_frames = r.max_frames if r.max_frames and r.max_frames > 0 else None
    n_audio = int(r.audio_frames or r.features[0].shape[0])
    plan = plan_long_video(n_audio, clip=r.clip_frames, motion=r.motion_frames,
                           max_frames=max_frames, fps=r.fps)
    steps = int(r.steps)
    sigmas = flow_sigmas(steps, r.shift)
    guidance = Guidance(r.text_scale, r.audio_scale)
    total_steps = steps * plan.num_windows
    _, _, f_lat, h, w = r.y.shape
    reference = r.reference.float()
    ref_latent = r.reference_latent if r.reference_latent is not None \
        else r.y[:, MASK_CHANNELS:, :1]
    features = [fit_length(f.float(), n_audio) for f in r.features]
    log.info("InfiniteTalk: %d audio frames (%.2f s) -> %d frames in %d window(s) of %d "
             "(motion %d), %d steps x %d pass(es), solver %s", n_audio, n_audio / r.fps,
             plan.total_frames, plan.num_windows, plan.clip, plan.motion, steps,
             len(guidance.passes), r.solver)

    video: Optional[torch.Tensor] = None
    motion_latents = ref_latent.float()
    window_log = []
    for win in plan.windows:
        t0 = time.perf_counter()
        audio = window_audio(plan, win, features, r.masks)
        silent = audio.silent()
        model_fn = _make_model_fn(model, r, audio, silent, device)
        noise = make_noise((1, LATENT_CHANNELS, f_lat, h, w), (int(r.seed) + win.index) & SEED_MASK,
                           device=device)
        offset = win.index * steps
        window_cb = SamplingCallbacks(
            progress=None if cb.progress is None else
            (lambda i, _n, o=offset: cb.progress(o + i, total_steps)),
            preview=None if cb.preview is None else
            (lambda i, x0, o=offset: cb.preview(o + i, x0)),
            should_stop=cb.should_stop)
        motion = motion_latents.to(device)
        if motion.shape[2] != win.motion_latent_frames:
            raise ValueError(f"window {win.index}: motion latents have {motion.shape[2]} frames, "
                             f"the plan expects {win.motion_latent_frames}")
        latents = sample_window(model_fn, noise, sigmas, solver=r.solver, guidance=guidance,
                                motion_latents=motion, callbacks=window_cb)
        del noise, model_fn, audio, silent
        t1 = time.perf_counter()
        frames = vae_decode(latents)
        del latents
        frames = match_colors(frames.float().clamp(0.0, 1.0), reference.to(frames.device),
                              r.color_strength)
        if frames.shape[0] < win.keep_end:
            raise ValueError(f"vae_decode returned {frames.shape[0]} frames for a window of "
                             f"{win.frames}")
        if video is None:
            video = torch.empty((plan.total_frames, *frames.shape[1:]), dtype=r.host_dtype)
        video[win.out_start:win.out_end] = frames[win.keep_start:win.keep_end].to(
            "cpu", r.host_dtype)
        t2 = time.perf_counter()
        if win.index + 1 < plan.num_windows:
            motion_latents = vae_encode(frames[-plan.motion:]).float()
        del frames
        t3 = time.perf_counter()
        entry = {"window": win.index, "audio_frames": (win.audio_start, win.audio_end),
                 "output_frames": (win.out_start, win.out_end), "sample_s": t1 - t0,
                 "decode_s": t2 - t1, "encode_s": t3 - t2}
        window_log.append(entry)
        log.info("InfiniteTalk window %d/%d: frames %d-%d (audio %d-%d), sample %.1f s, "
                 "decode %.1f s, encode %.1f s%s", win.index + 1, plan.num_windows,
                 win.out_start, win.out_end - 1, win.audio_start, win.audio_end - 1,
                 entry["sample_s"], entry["decode_s"], entry["encode_s"], _streamer_stats(model))
    return VideoResult(frames=video, num_frames=plan.total_frames, fps=r.fps, plan=plan,
                       window_log=window_log)
