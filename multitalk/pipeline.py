"""The long-video driver: reference image + speech features -> talking video of any length.

    result = generate_video(model, request, vae_encode, vae_decode, callbacks)

It walks the windows of `long_video.plan_long_video` (docs/REFERENCE_NOTES.md §4). Per window:
  1. audio: each speaker's wav2vec rows for the window's frames (f-2..f+2 per frame, the tail
     mirrored past the end of the audio) -> AudioInput;
  2. motion latents: window 0 the encoded reference (1 latent frame), later windows the VAE
     encoding of the previous window's last `motion` colour-corrected frames (3 latent frames);
     `wanvideo.sampling.sample_window` writes them, clean, before every model call;
  3. noise from `make_noise(seed + window index)` (CPU generator: same on every device);
  4. the guidance passes (cond = positive text + audio, no_text = negative text + audio,
     no_audio / uncond = positive / negative text + silent audio), t = sigma * 1000;
  5. decode, colour-correct towards the reference, and hand the plan's frames to the frame sink
     (frame_sink.py: a host buffer allocated once, or an MP4 written window by window), so device
     memory never grows with length and, streamed, neither does host memory.
In dubbing (request.window_condition) each window brings its own image condition and CLIP tokens
(dubbing.py); everything else above is unchanged. Every window's latents and frames are checked
for NaN/Inf, and preflight() checks the model, the inputs and the memory before any work.
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

from ..wanvideo.config import latent_tokens
from ..wanvideo.guidance import Guidance
from ..wanvideo.sampling import SamplingCallbacks, make_noise
from ..wanvideo.schedules import flow_sigmas
from ..wanvideo.solvers import SOLVERS
from . import audio_windows as aw
from .audio_proj import AudioInput
from .audio_windows import reflect_pad
from .color import match_colors
from .conditions import (LATENT_CHANNELS, MASK_CHANNELS, NonFiniteError,  # noqa: F401 (API)
                         condition_frames, condition_y, require_finite)
from .dubbing import check_condition
from .frame_sink import FrameSink, MemorySink
from .framing import fit_image  # noqa: F401  (part of this module's API)
from .long_video import CLIP_FRAMES, FPS, MOTION_FRAMES, LongVideoPlan, Window, plan_long_video
from .window_job import WindowJob, WindowSampler, run_window

log = logging.getLogger(__name__)

VaeEncode = Callable[[torch.Tensor], torch.Tensor]
VaeDecode = Callable[[torch.Tensor], torch.Tensor]
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
    # Dubbing: window -> dubbing.WindowCondition (that window's y, CLIP tokens, reference frame);
    # None = image mode, y / clip_fea above for every window. y is window 0's condition either way.
    window_condition: Optional[Callable] = None
    color_per_window: bool = False      # colour target: the window's reference, not `reference`


@dataclass
class VideoResult:
    frames: Optional[torch.Tensor]  # [N, H, W, 3] on the host, 0..1 (None when streamed to a file)
    num_frames: int
    fps: int
    plan: LongVideoPlan
    window_log: list = field(default_factory=list)  # per window: dict of frame ranges and timings
    output: object = None         # what the frame sink returned (the frames, or an MP4 path)

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


def check_model(model) -> None:
    """InfiniteTalk animates an image: the model must be Wan2.1 I2V with the audio layers."""
    cfg = getattr(model, "config", None)
    if cfg is None:  # a stand-in callable (tests), not a WanModel
        return
    if not cfg.has_image_embedding:
        raise ValueError(f"this model is Wan2.1 {cfg.model_type.upper()} ({cfg.num_layers} blocks, "
                         f"dim {cfg.dim}); InfiniteTalk needs the image-to-video model "
                         "(e.g. wan2.1_i2v_480p_14B), which reads the portrait and its CLIP tokens")
    if getattr(model, "audio_proj", None) is None:
        raise ValueError("this model has no InfiniteTalk layers; load a checkpoint with the "
                         "InfiniteTalk patch merged or applied")


def _check_audio_width(model, features: Sequence[torch.Tensor]) -> None:
    """wav2vec2 features must be as wide as the audio projection was trained on (12 x 768 for
    chinese-wav2vec2-base); another encoder gives a matrix-shape crash deep in the model."""
    proj = getattr(model, "audio_proj", None)
    first = getattr(proj, "proj1", None)
    if first is None or not features:
        return
    want = first.in_features // aw.WINDOW
    got = int(features[0].shape[1]) * int(features[0].shape[2])
    if got != want:
        raise ValueError(f"the audio features are {list(features[0].shape[1:])} per frame "
                         f"({got} values) but this model's InfiniteTalk layers read {want}; "
                         "use the wav2vec2 encoder InfiniteTalk was trained with "
                         "(chinese-wav2vec2-base: 12 layers x 768)")


def _check_finite(r: VideoRequest) -> None:
    for what, t in (("the portrait (reference)", r.reference), ("the image condition y", r.y),
                    ("the CLIP vision tokens", r.clip_fea), ("the positive prompt", r.positive),
                    ("the negative prompt", r.negative)):
        require_finite(t, what)
    for i, f in enumerate(r.features):
        require_finite(f, f"speaker {i + 1}'s audio features",
                       "the speech or the wav2vec2 weights are corrupt")


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
    _check_finite(r)


def window_audio(plan: LongVideoPlan, window: Window, features: Sequence[torch.Tensor],
                 masks: Optional[torch.Tensor]) -> AudioInput:
    """The window's per-frame audio windows for every speaker -> AudioInput [n_spk, clip, 5, ...]."""
    idx = torch.tensor(plan.window_audio_indices(window), dtype=torch.long)
    stacked = torch.stack([f[idx.to(f.device)] for f in features])
    return AudioInput(stacked, masks=masks if len(features) == 2 else None)


_ADDITIVE_STATS = ("forwards", "bytes_moved", "copy_ms", "wait_ms")


def _streamer_stats(model) -> dict | None:
    streamer = getattr(model, "block_streamer", None)
    stats = getattr(streamer, "stats", None)
    return stats() if callable(stats) else None


def _restart_streamer_stats(model) -> dict | None:
    """Counters restart with every video (the streamer lives on a model ComfyUI caches)."""
    streamer = getattr(model, "block_streamer", None)
    if callable(getattr(streamer, "reset_stats", None)):
        streamer.reset_stats()
    return _streamer_stats(model)


def _window_stats_text(before: dict | None, after: dict | None) -> str:
    """This window's BlockSwap figures: counters as differences, peak VRAM since the video began."""
    if before is None or after is None:
        return ""
    d = {k: after.get(k, 0) - before.get(k, 0) for k in _ADDITIVE_STATS}
    return (f"; BlockSwap {after.get('blocks_swapped', '?')} blocks, {d['forwards']} forwards, "
            f"{d['bytes_moved'] / 1e9:.2f} GB moved, copy {d['copy_ms']:.0f} ms, "
            f"waited {d['wait_ms']:.0f} ms, peak VRAM {after.get('peak_vram_bytes', 0) / 1e9:.2f} GB")


def fit_length(features: torch.Tensor, frames: int) -> torch.Tensor:
    """Features with exactly `frames` rows. The wav2vec recipe yields int(seconds*25) rows while
    the video has round(seconds*25) frames: at most one row differs, filled by reflection."""
    if features.shape[0] >= frames:
        return features[:frames]
    return reflect_pad(features, frames)[:frames]


def video_host_bytes(plan: LongVideoPlan, height: int, width: int,
                     dtype: torch.dtype = torch.float32, in_memory: bool = True) -> int:
    """Host memory of the finished video (when it is kept in memory) plus one window's decoded
    frames being processed (the decode, its colour-corrected copy and the kept slice)."""
    item = torch.empty((), dtype=dtype).element_size()
    frame = height * width * 3
    return plan.total_frames * frame * item * in_memory + 3 * plan.clip * frame * 4


def _check_memory(model, r: VideoRequest, plan: LongVideoPlan, in_memory: bool) -> None:
    from ..wanvideo.memory import require_device, require_host

    _, _, f_lat, h, w = r.y.shape
    height, width = int(h) * 8, int(w) * 8
    require_host(video_host_bytes(plan, height, width, r.host_dtype, in_memory),
                 f"the video ({plan.total_frames} frames at {width}x{height})",
                 "write it to an MP4 as it is made (the sampler's stream_to_mp4), shorten it "
                 "with max_frames, lower the resolution or free host RAM")
    cfg = getattr(model, "config", None)
    if cfg is not None:
        from ..wanvideo.block_swap import estimate_activation_bytes

        tokens = latent_tokens(r.y.shape, cfg.patch_size)
        item = torch.empty((), dtype=getattr(model, "compute_dtype", torch.bfloat16)).element_size()
        need = estimate_activation_bytes(tokens, cfg.dim, cfg.ffn_dim, item)
        require_device(need, r.device, f"one model pass over {tokens:,} tokens "
                       f"({r.clip_frames} frames at {width}x{height})",
                       "lower the resolution or the clip length", whole=True)


@dataclass
class _WindowRun:
    """What one window needs besides the plan: fixed for the whole video."""
    model: object
    request: VideoRequest
    plan: LongVideoPlan
    features: list
    sigmas: list
    guidance: Guidance
    reference: torch.Tensor
    callbacks: SamplingCallbacks
    window_sampler: Optional[WindowSampler] = None   # None: run_window in this process


def _window_callbacks(cb: SamplingCallbacks, offset: int, total: int) -> SamplingCallbacks:
    return SamplingCallbacks(
        progress=None if cb.progress is None else (lambda i, _n: cb.progress(offset + i, total)),
        preview=None if cb.preview is None else (lambda i, x0: cb.preview(offset + i, x0)),
        should_stop=cb.should_stop)


def _window_condition(run: _WindowRun, win: Window):
    """Dubbing: the window's own condition (checked); image mode: None."""
    r = run.request
    if r.window_condition is None:
        return None
    cond = r.window_condition(win)
    check_condition(cond, win, run.plan, tuple(r.y.shape))
    return cond


def _sample(run: _WindowRun, win: Window, motion_latents: torch.Tensor, cond) -> torch.Tensor:
    r, plan = run.request, run.plan
    _, _, f_lat, h, w = r.y.shape
    y, clip_fea = (r.y, r.clip_fea) if cond is None else (cond.y, cond.clip_fea)
    if motion_latents.shape[2] != win.motion_latent_frames:
        raise ValueError(f"window {win.index}: motion latents have {motion_latents.shape[2]} "
                         f"frames, the plan expects {win.motion_latent_frames}")
    label = f"window {win.index + 1}/{plan.num_windows}"
    noise = make_noise((1, LATENT_CHANNELS, f_lat, h, w), (int(r.seed) + win.index) & SEED_MASK)
    job = WindowJob(noise, run.sigmas, r.solver, r.text_scale, r.audio_scale, motion_latents, y,
                    clip_fea, r.positive, r.negative,
                    window_audio(plan, win, run.features, r.masks), label,
                    preview=run.callbacks.preview is not None)
    steps = len(run.sigmas) - 1
    callbacks = _window_callbacks(run.callbacks, win.index * steps, steps * plan.num_windows)
    if run.window_sampler is None:
        latents = run_window(run.model, job, torch.device(r.device), callbacks)
    else:
        latents = run.window_sampler(job, callbacks)
    require_finite(latents, f"{label}: the sampled latents",
                   "the model produced NaN/Inf (corrupt weights, or fp16 overflow: try bf16)")
    return latents


def _decode(run: _WindowRun, win: Window, latents: torch.Tensor, vae_decode: VaeDecode,
            cond) -> torch.Tensor:
    frames = vae_decode(latents)
    require_finite(frames, f"window {win.index + 1}/{run.plan.num_windows}: the decoded frames",
                   "the VAE produced NaN/Inf (a corrupt VAE file?)")
    target = cond.reference if cond is not None and run.request.color_per_window \
        else run.reference
    frames = match_colors(frames.float().clamp(0.0, 1.0), target.float().to(frames.device),
                          run.request.color_strength)
    if frames.shape[0] < win.keep_end:
        raise ValueError(f"vae_decode returned {frames.shape[0]} frames for a window of "
                         f"{win.frames}")
    return frames


def preflight(model, request: VideoRequest, in_memory: bool = True) -> LongVideoPlan:
    """Every check that can fail before any work (model kind, shapes, NaN/Inf inputs, memory);
    returns the window plan. generate_video runs it too; callers may run it first to fail
    before they prepare anything else (BlockSwap, unloading other models)."""
    check_model(model)
    _check(request)
    _check_audio_width(model, request.features)
    r = request
    max_frames = r.max_frames if r.max_frames and r.max_frames > 0 else None
    plan = plan_long_video(int(r.audio_frames or r.features[0].shape[0]), clip=r.clip_frames,
                           motion=r.motion_frames, max_frames=max_frames, fps=r.fps)
    _check_memory(model, r, plan, in_memory)
    return plan


def generate_video(model, request: VideoRequest, vae_encode: VaeEncode, vae_decode: VaeDecode,
                   callbacks: Optional[SamplingCallbacks] = None,
                   sink: Optional[FrameSink] = None,
                   window_sampler: Optional[WindowSampler] = None) -> VideoResult:
    """Generate the whole video; see the module docstring. Finished frames go to `sink` window
    by window (default: a MemorySink, whose tensor becomes result.frames). Raises
    SamplingInterrupted when callbacks.should_stop() turns True (checked before every model
    call), NonFiniteError when a window's latents or frames hold NaN/Inf, MemoryBudgetError when
    the video cannot fit; the sink is aborted then (no half-written file is left).
    window_sampler(job, callbacks) -> latents denoises each window instead of this process
    (the multi-GPU runtime, multi_gpu.WorkerPool.sample_window); `model` then only has to
    answer preflight's questions (config, InfiniteTalk layers)."""
    sink = sink if sink is not None else MemorySink(request.host_dtype)
    plan = preflight(model, request, in_memory=isinstance(sink, MemorySink))
    try:
        return _generate(model, request, plan, vae_encode, vae_decode, callbacks, sink,
                         window_sampler)
    except BaseException:
        sink.abort()
        raise


def _generate(model, request, plan, vae_encode, vae_decode, callbacks, sink,
              window_sampler=None) -> VideoResult:
    r = request
    n_audio = int(r.audio_frames or r.features[0].shape[0])
    run = _WindowRun(model, r, plan, [fit_length(f.float(), n_audio) for f in r.features],
                     flow_sigmas(int(r.steps), r.shift), Guidance(r.text_scale, r.audio_scale),
                     r.reference.float(), callbacks or SamplingCallbacks(), window_sampler)
    log.info("InfiniteTalk: %d audio frames (%.2f s) -> %d frames in %d window(s) of %d "
             "(motion %d), %d steps x %d pass(es), solver %s", n_audio, n_audio / r.fps,
             plan.total_frames, plan.num_windows, plan.clip, plan.motion, int(r.steps),
             len(run.guidance.passes), r.solver)
    stats = _restart_streamer_stats(model)
    ref_latent = r.reference_latent if r.reference_latent is not None \
        else r.y[:, MASK_CHANNELS:, :1]
    motion_latents, started, window_log = ref_latent.float(), False, []
    for win in plan.windows:
        t0, stats_before = time.perf_counter(), stats
        cond = _window_condition(run, win)
        latents = _sample(run, win, motion_latents, cond)
        t1 = time.perf_counter()
        frames = _decode(run, win, latents, vae_decode, cond)
        del latents
        if not started:
            sink.start(plan.total_frames, int(frames.shape[1]), int(frames.shape[2]))
            started = True
        sink.write(frames[win.keep_start:win.keep_end], win.out_start)
        t2 = time.perf_counter()
        if win.index + 1 < plan.num_windows:
            motion_latents = vae_encode(frames[-plan.motion:]).float()
        del frames
        entry = {"window": win.index, "audio_frames": (win.audio_start, win.audio_end),
                 "output_frames": (win.out_start, win.out_end), "sample_s": t1 - t0,
                 "decode_s": t2 - t1, "encode_s": time.perf_counter() - t2}
        window_log.append(entry)
        stats = _streamer_stats(model)
        log.info("InfiniteTalk window %d/%d: frames %d-%d (audio %d-%d), sample %.1f s, "
                 "decode %.1f s, encode %.1f s%s", win.index + 1, plan.num_windows,
                 win.out_start, win.out_end - 1, win.audio_start, win.audio_end - 1,
                 entry["sample_s"], entry["decode_s"], entry["encode_s"],
                 _window_stats_text(stats_before, stats))
    output = sink.finish()
    return VideoResult(frames=output if isinstance(sink, MemorySink) else None,
                       num_frames=plan.total_frames, fps=r.fps, plan=plan,
                       window_log=window_log, output=output)
