"""WanVideo InfiniteTalk Sampler: model + prompts + image condition + audio -> frames and audio.

Only ComfyUI plumbing lives here (devices, VAE, progress bar, previews, interrupt, BlockSwap
install/release); the window loop is multitalk.pipeline.generate_video.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os

import torch
from comfy_api.latest import io

from ..multitalk.audio_features import SAMPLE_RATE
from ..multitalk.long_video import FPS, frames_for_seconds
from ..wanvideo.config import latent_tokens
from .conditioning import vae_encode, wan_latent_format
from .model_loader import WANVIDEOMODEL
from .multi_gpu import WANVIDEOMULTIGPU, MultiGpuArgs, ensure_local, window_sampler
from .text_embeds import conditioning_tensor
from .types import BLOCKSWAPARGS, INFINITETALK_AUDIO, INFINITETALK_COND

CATEGORY = "WanVideo InfiniteTalk"
SCHEDULERS = ["euler", "unipc"]

log = logging.getLogger(__name__)


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Normalised latents [1, 16, F_lat, h, w] -> frames [F, H, W, 3] 0..1 on the host."""
    raw = wan_latent_format().process_out(latents.float().cpu())
    frames = vae.decode(raw)
    return frames.reshape(-1, *frames.shape[-3:]).float().cpu()


def video_frames(audio: dict | None, features) -> int:
    """round(seconds x 25) for the audio the video belongs to (feature rows without it)."""
    if audio is None:
        return int(features[0].shape[0])
    return max(1, frames_for_seconds(audio["waveform"].shape[-1] / int(audio["sample_rate"])))


def trim_audio(audio: dict | None, seconds: float) -> dict | None:
    """The AUDIO cut (or zero-padded) to exactly `seconds`."""
    if audio is None:
        return None
    wave, rate = audio["waveform"], int(audio["sample_rate"])
    n = int(round(seconds * rate))
    if wave.shape[-1] >= n:
        wave = wave[..., :n]
    else:
        wave = torch.nn.functional.pad(wave, (0, n - wave.shape[-1]))
    return {"waveform": wave.contiguous(), "sample_rate": rate}


def _frame_masks(audio_embeds, conditioning):
    """Speaker masks span the portrait; the video frame is its cover-and-crop."""
    from ..multitalk.framing import fit_masks

    masks = getattr(audio_embeds, "masks", None)
    size = getattr(conditioning, "source_size", None)
    if masks is None or size is None:
        return masks
    return fit_masks(masks, size[0], size[1], conditioning.width, conditioning.height)


def block_swap_kwargs(args, tokens: int | None = None) -> dict:
    """BLOCKSWAPARGS as produced by the BlockSwap settings node (types.BlockSwapArgs, whose
    `kwargs(tokens)` maps to wanvideo.block_swap.BlockSwap), or a plain dict of those keywords."""
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    if hasattr(args, "kwargs") and callable(args.kwargs):
        return dict(args.kwargs(tokens))
    if dataclasses.is_dataclass(args):
        return dataclasses.asdict(args)
    raise ValueError(f"unsupported BLOCKSWAPARGS value {type(args).__name__}")


def prepare_block_swap(model, args, device, tokens: int | None = None):
    """Make the model stream with this prompt's BlockSwap settings (wanvideo.block_swap.install:
    a new streamer, or the one a previous prompt left on this cached model re-configured, e.g.
    for another prefetch, pinning, non-block offload, blocks_to_swap or, in auto mode, this
    resolution); returns the streamer in use (None when no settings apply and none is attached).
    Settings missing from a plain dict take their defaults. The streamer stays attached to the
    cached model (host masters only); its device slots are released after every run."""
    kwargs = block_swap_kwargs(args, tokens)
    if not kwargs:
        return getattr(model, "block_streamer", None)
    from ..wanvideo.block_swap import install

    kwargs.pop("device", None)
    kwargs.setdefault("tokens", tokens)
    return install(model, device=device, **kwargs)


def free_device_memory(device) -> None:
    """Ask ComfyUI to unload its models (text encoder, CLIP vision, VAE) before our transformer
    runs: it lives outside ComfyUI's model management (docs/ARCHITECTURE.md §6)."""
    import comfy.model_management as mm

    if torch.device(device).type != "cpu":
        mm.unload_all_models()
        mm.soft_empty_cache()


def comfy_callbacks(total_steps: int, device):
    """SamplingCallbacks wired to ComfyUI: one ProgressBar over all windows, latent previews
    as ComfyUI's preview settings ask, and its interrupt flag."""
    import comfy.model_management as mm
    import comfy.utils
    import latent_preview

    from ..wanvideo.sampling import SamplingCallbacks

    pbar = comfy.utils.ProgressBar(total_steps)
    previewer = latent_preview.get_previewer(device, wan_latent_format())
    pending = {}

    def preview(step, x0):
        if previewer is not None:
            pending["image"] = previewer.decode_latent_to_preview_image("JPEG", x0.float().cpu())

    def progress(done, total):
        pbar.update_absolute(done, total, pending.pop("image", None))

    return SamplingCallbacks(progress=progress, preview=preview if previewer else None,
                             should_stop=mm.processing_interrupted)


class WanVideoInfiniteTalkSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanVideoInfiniteTalkSampler",
            display_name="WanVideo InfiniteTalk Sampler",
            category=CATEGORY,
            description="Generates a talking video of the whole audio in overlapping windows "
                        "(motion frames carry each window into the next), decodes it with the "
                        "VAE and returns the frames plus the audio trimmed to their length.",
            inputs=[
                WANVIDEOMODEL.Input("model", tooltip="Wan2.1 I2V 14B with InfiniteTalk layers, "
                                    "from WanVideo Model Loader."),
                io.Conditioning.Input("positive", tooltip="Positive prompt (umT5 CLIPTextEncode "
                                      "or WanVideo Load Text Embeds)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt (umT5 CLIPTextEncode "
                                      "or WanVideo Load Text Embeds)."),
                INFINITETALK_COND.Input("conditioning", tooltip="From InfiniteTalk Image to "
                                        "Video: the portrait, its VAE condition, CLIP tokens, "
                                        "clip length and motion frames."),
                INFINITETALK_AUDIO.Input("audio_embeds", tooltip="From InfiniteTalk Audio "
                                         "Embeds: wav2vec features per speaker and the audio."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE: decodes each window and encodes "
                             "its last frames as the next window's motion frames."),
                io.Int.Input("steps", default=40, min=1, max=200,
                             tooltip="Denoising steps per window (official 40; 4-8 with "
                                     "distilled LoRAs such as lightx2v, with both guidances 1)."),
                io.Float.Input("shift", default=7.0, min=0.1, max=50.0, step=0.1,
                               tooltip="Flow-matching time shift: 7 for 480p, 11 for 720p."),
                io.Float.Input("text_guidance", default=5.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Text CFG scale (official 5). 1 skips the negative-prompt "
                                       "pass."),
                io.Float.Input("audio_guidance", default=4.0, min=0.0, max=30.0, step=0.1,
                               tooltip="Audio CFG scale (official 4): stronger lip sync. Both "
                                       "scales 1 = one model pass per step."),
                io.Combo.Input("scheduler", options=SCHEDULERS, default="euler",
                               tooltip="ODE solver: euler (official InfiniteTalk loop) or unipc "
                                       "(Wan's multistep solver)."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             control_after_generate=True,
                             tooltip="Noise seed; window k uses seed + k. Same seed, same "
                                     "device -> same video."),
                io.Float.Input("color_correction", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Strength of the Lab colour matching of every window to "
                                       "the reference image (0 = off). 0.3-1 counters colour "
                                       "drift in videos over about a minute."),
                io.Int.Input("max_frames", default=0, min=0, max=1_000_000,
                             tooltip="Stop after this many frames (25 per second); 0 = the "
                                     "whole audio."),
                BLOCKSWAPARGS.Input("block_swap_args", optional=True,
                                    tooltip="BlockSwap settings: stream transformer blocks from "
                                            "host RAM for GPUs smaller than the model."),
                io.Boolean.Input("stream_to_mp4", default=False, optional=True,
                                 tooltip="Write each finished window straight into an MP4 (with "
                                         "the audio) in ComfyUI's output folder, so host memory "
                                         "stays flat however long the audio is (10 minutes at "
                                         "832x480 would be 72 GB as IMAGE frames). The video "
                                         "output is that file; images then holds only the "
                                         "first frame."),
                io.String.Input("filename_prefix", default="InfiniteTalk", optional=True,
                                tooltip="File name prefix of the streamed MP4 inside the output "
                                        "folder (sub-folders allowed)."),
                WANVIDEOMULTIGPU.Input("multi_gpu", optional=True,
                                       tooltip="From WanVideo Multi-GPU: share every window "
                                               "between several GPUs (one worker process per "
                                               "GPU, each with its own copy of the model; "
                                               "BlockSwap settings apply on every GPU)."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The video frames [N, H, W, 3] "
                                "(only the first frame when stream_to_mp4 is on)."),
                io.Audio.Output(display_name="audio", tooltip="The input audio trimmed to the "
                                "video's length (N / 25 s), for CreateVideo."),
                io.Video.Output(display_name="video", tooltip="The video with its audio at 25 "
                                "fps, for SaveVideo: the streamed MP4 file, or built from the "
                                "frames in memory."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, conditioning, audio_embeds, vae, steps=40,
                shift=7.0, text_guidance=5.0, audio_guidance=4.0, scheduler="euler", seed=0,
                color_correction=0.0, max_frames=0, block_swap_args=None, stream_to_mp4=False,
                filename_prefix="InfiniteTalk", multi_gpu=None) -> io.NodeOutput:
        import comfy.model_management as mm

        from ..multitalk.pipeline import generate_video, preflight
        from ..wanvideo.sampling import SamplingInterrupted

        request = _request(positive, negative, conditioning, audio_embeds, steps, shift,
                           text_guidance, audio_guidance, scheduler, seed, color_correction,
                           max_frames, mm.get_torch_device())
        wan, device = model.model, request.device
        sink, saved = _sink(stream_to_mp4, filename_prefix, audio_embeds, conditioning)
        # model kind, NaN/Inf inputs, memory: before any work
        plan = preflight(wan, request, in_memory=sink is None)
        _dubbing(request, conditioning, plan)
        free_device_memory(device)
        sampler, release = _windows(model, multi_gpu, block_swap_args, device, conditioning)
        wan = model.model   # loaded again if an earlier multi-GPU prompt released it
        callbacks = comfy_callbacks(int(steps) * plan.num_windows, device)
        try:
            result = generate_video(wan, request, lambda f: vae_encode(vae, f),
                                    lambda z: vae_decode(vae, z), callbacks, sink=sink,
                                    window_sampler=sampler)
        except SamplingInterrupted:
            mm.throw_exception_if_processing_interrupted()
            raise
        finally:
            release()
        audio = trim_audio(getattr(audio_embeds, "audio", None), result.seconds)
        if audio is None:
            audio = {"waveform": torch.zeros(1, 1, int(round(result.seconds * SAMPLE_RATE))),
                     "sample_rate": SAMPLE_RATE}
        if sink is None:
            return io.NodeOutput(result.frames, audio, _video_in_memory(result.frames, audio))
        from comfy_api.latest import InputImpl, ui

        log.info("WanVideo InfiniteTalk Sampler: %d frames streamed to %s", result.num_frames,
                 saved["filename"])
        return io.NodeOutput(sink.first_frame, audio, InputImpl.VideoFromFile(result.output),
                             ui=ui.PreviewVideo([saved]))


def _request(positive, negative, conditioning, audio_embeds, steps, shift, text_guidance,
             audio_guidance, scheduler, seed, color_correction, max_frames, device):
    """The sampler's inputs, checked, as a library VideoRequest."""
    from ..multitalk.pipeline import VideoRequest

    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not one of {SCHEDULERS}")
    for name, value in (("shift", shift), ("text_guidance", text_guidance),
                        ("audio_guidance", audio_guidance),
                        ("color_correction", color_correction)):
        if not math.isfinite(float(value)):   # NaN passes ComfyUI's min/max comparisons
            raise ValueError(f"{name} must be a finite number, got {value}")
    features = list(getattr(audio_embeds, "features", None) or [])
    if not features:
        raise ValueError("audio_embeds carries no audio features; connect InfiniteTalk "
                         "Audio Embeds")
    return VideoRequest(
        reference=conditioning.reference, y=conditioning.y, clip_fea=conditioning.clip_fea,
        positive=conditioning_tensor(positive, "positive"),
        negative=conditioning_tensor(negative, "negative"),
        features=features, masks=_frame_masks(audio_embeds, conditioning), steps=int(steps),
        shift=float(shift), text_scale=float(text_guidance),
        audio_scale=float(audio_guidance), solver=scheduler, seed=int(seed),
        color_strength=float(color_correction), clip_frames=conditioning.clip_frames,
        motion_frames=conditioning.motion_frames, max_frames=int(max_frames) or None,
        fps=FPS, device=device,
        audio_frames=video_frames(getattr(audio_embeds, "audio", None), features))


def _dubbing(request, conditioning, plan) -> None:
    """Video-to-video: decode the scheduled source frames (only those) and condition each window
    on its own; logs which source time conditions which window."""
    source = getattr(conditioning, "dubbing", None)
    if source is None:
        return
    from ..multitalk.dubbing import WindowCondition, dubbing_conditions
    from ..multitalk.reference_schedule import reference_schedule
    from .dubbing import clip_encoder

    frames = source.frames
    schedule = reference_schedule(plan, frames.num_frames, frames.fps, source.past_end)
    for line in schedule.describe(plan):
        log.info("InfiniteTalk dubbing: %s", line)
    fitted = frames.read(schedule.needed(), conditioning.width, conditioning.height)
    first = WindowCondition(conditioning.y, conditioning.clip_fea, conditioning.reference, 0)
    request.window_condition = dubbing_conditions(
        schedule, fitted, conditioning.clip_frames, lambda px: vae_encode(source.vae, px),
        clip_encoder(source.clip_vision), device=request.device,
        known=first if schedule.frames[0] == 0 else None)
    request.color_per_window = source.color_reference == "window_reference"


def _windows(model, multi_gpu, block_swap_args, device, conditioning):
    """(window sampler, release): the multi-GPU workers', or (None: this process) with
    BlockSwap installed here. release() frees the per-run device memory either way."""
    if multi_gpu is not None:
        if not isinstance(multi_gpu, MultiGpuArgs):
            raise ValueError("multi_gpu: expected the output of WanVideo Multi-GPU, got "
                             f"{type(multi_gpu).__name__}")
        tokens = latent_tokens(conditioning.y.shape, model.model.config.patch_size)
        sampler, release = window_sampler(model, multi_gpu,
                                          block_swap_kwargs(block_swap_args, tokens))
        if sampler is not None:
            return sampler, release
    ensure_local(model)
    streamer = _block_swap(model, block_swap_args, device, conditioning.y.shape)

    def release_streamer():
        if streamer is not None and hasattr(streamer, "release"):
            streamer.release()

    return None, release_streamer


def _block_swap(model, block_swap_args, device, y_shape):
    wan = model.model
    tokens = latent_tokens(y_shape, wan.config.patch_size)
    if block_swap_args is None:
        attached = getattr(wan, "block_streamer", None) is not None
        parked = model.device is not None and \
            torch.device(model.device).type != torch.device(device).type
        if attached or parked:
            # No settings connected, but the weights live on the offload device or a previous
            # prompt left a streamer on this cached model: stream with automatic sizing for
            # this prompt's resolution (0 swapped blocks when the whole model fits).
            log.info("WanVideo InfiniteTalk Sampler: %s; BlockSwap with automatic sizing",
                     "BlockSwap settings disconnected" if attached
                     else f"model is on {model.device}, computing on {device}")
            block_swap_args = {"blocks_to_swap": "auto", "tokens": tokens}
    return prepare_block_swap(wan, block_swap_args, device, tokens)


def _sink(stream: bool, prefix: str, audio_embeds, conditioning):
    """(Mp4Sink into ComfyUI's output folder, its SavedResult) when streaming, else (None, None)."""
    if not stream:
        return None, None
    import folder_paths
    from comfy_api.latest import io as comfy_io, ui

    from ..multitalk.frame_sink import Mp4Sink

    out_dir = folder_paths.get_output_directory()
    # get_save_image_path refuses prefixes that leave the output folder.
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        prefix or "InfiniteTalk", out_dir, conditioning.width, conditioning.height)
    file = f"{name}_{counter:05}_.mp4"
    sink = Mp4Sink(os.path.join(folder, file), FPS, getattr(audio_embeds, "audio", None))
    return sink, ui.SavedResult(file, subfolder, comfy_io.FolderType.output)


def _video_in_memory(frames: torch.Tensor, audio: dict):
    from fractions import Fraction

    from comfy_api.latest import InputImpl, Types

    return InputImpl.VideoFromComponents(Types.VideoComponents(
        images=frames, audio=audio, frame_rate=Fraction(FPS)))
