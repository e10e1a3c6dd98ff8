"""InfiniteTalk Video to Video (dubbing): a source video + Wan VAE (+ CLIP vision) ->
INFINITETALK_COND whose every window is conditioned on the source frame shown at its start.

The node reads only frame 0 (the first window's condition and the colour reference); the sampler
knows the audio length, plans the windows and then decodes just the scheduled frames
(multitalk.frame_source) to build each window's condition (multitalk.dubbing).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io

from .conditioning import CLIP_DIM, CLIP_TOKENS, clip_features, vae_encode
from .types import INFINITETALK_COND, InfiniteTalkCond

CATEGORY = "WanVideo InfiniteTalk"
PAST_END = ["freeze", "loop", "pingpong"]
COLOR_REFERENCES = ["source_frame_0", "window_reference"]

log = logging.getLogger(__name__)


@dataclass
class DubbingSource:
    """What the sampler needs to condition every window on its own source frame."""
    frames: Any              # multitalk.frame_source.FrameSource
    vae: Any
    clip_vision: Any = None
    past_end: str = "freeze"
    color_reference: str = "source_frame_0"


def frame_source(source_video, source_images, source_fps):
    """The connected source as a lazy FrameSource (a file-backed VIDEO is never decoded whole)."""
    from ..multitalk.frame_source import TensorFrames, VideoFileFrames

    if (source_video is None) == (source_images is None):
        raise ValueError("connect exactly one source: source_video (LoadVideo) or source_images "
                         "(an IMAGE batch, with source_fps)")
    if source_images is not None:
        return TensorFrames(source_images, source_fps, "source_images")
    stream = getattr(source_video, "get_stream_source", None)
    if callable(stream):
        return VideoFileFrames(stream(), "source_video")
    try:
        parts = source_video.get_components()
    except AttributeError:
        raise ValueError(f"source_video: expected a VIDEO (from LoadVideo or CreateVideo), got "
                         f"{type(source_video).__name__}") from None
    return TensorFrames(parts.images, float(parts.frame_rate), "source_video")


def clip_encoder(clip_vision):
    """Frame [1, H, W, 3] -> CLIP tokens [1, 257, 1280] with ComfyUI's model (centre crop, as
    CLIPVisionEncode does), or None for zero tokens."""
    if clip_vision is None:
        return None
    return lambda frame: clip_features(clip_vision.encode_image(frame, crop=True))


class InfiniteTalkVideoToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfiniteTalkVideoToVideo",
            display_name="InfiniteTalk Video to Video (dubbing)",
            category=CATEGORY,
            description="Re-voices a video: every window of the new video is conditioned on the "
                        "source frame shown at its start (identity, framing and broad motion "
                        "follow the source), while lips, head and expressions follow the new "
                        "speech. The source's own audio is not used.",
            inputs=[
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE (encodes each window's source "
                             "frame)."),
                io.Video.Input("source_video", optional=True,
                               tooltip="The video to dub (LoadVideo). Read lazily: only the "
                                       "frames that condition a window are decoded."),
                io.Image.Input("source_images", optional=True,
                               tooltip="Alternatively the source as an IMAGE batch (then set "
                                       "source_fps)."),
                io.Float.Input("source_fps", default=25.0, min=1.0, max=240.0, step=0.001,
                               tooltip="Frame rate of source_images (a VIDEO carries its own). "
                                       "Source frames are matched by time: a 30 fps source is "
                                       "not played 1.2x fast."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="The ViT-H CLIP vision model (clip_vision_h): each "
                                            "window's source frame is encoded with it. Without "
                                            "it zero tokens are used (a warning is logged)."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16,
                             tooltip="Output width, a multiple of 16; source frames are scaled "
                                     "to cover and centre-cropped (upscaled when smaller)."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Output height, a multiple of 16."),
                io.Int.Input("clip_length", default=81, min=5, max=257, step=4,
                             tooltip="Frames per window, 4n+1 (official 81)."),
                io.Int.Input("motion_frames", default=9, min=1, max=256,
                             tooltip="Frames carried from one window into the next (official "
                                     "9); windows start every clip_length - motion_frames."),
                io.Combo.Input("past_end", options=PAST_END, default="freeze",
                               tooltip="When the speech is longer than the source: freeze the "
                                       "last frame (official), loop from the start, or "
                                       "pingpong (play backwards and forwards)."),
                io.Combo.Input("color_reference", options=COLOR_REFERENCES,
                               default="source_frame_0",
                               tooltip="Colour correction target (sampler's color_correction): "
                                       "source frame 0 (official) or each window's own source "
                                       "frame (follows lighting changes in the source)."),
            ],
            outputs=[INFINITETALK_COND.Output(
                display_name="conditioning",
                tooltip="Per-window conditioning from the source video, for the WanVideo "
                        "InfiniteTalk Sampler.")],
        )

    @classmethod
    def execute(cls, vae, source_video=None, source_images=None, source_fps=25.0,
                clip_vision=None, width=832, height=480, clip_length=81, motion_frames=9,
                past_end="freeze", color_reference="source_frame_0") -> io.NodeOutput:
        from ..multitalk.pipeline import condition_frames, condition_y, validate_size

        validate_size(width, height, clip_length, motion_frames)
        for name, value, options in (("past_end", past_end, PAST_END),
                                     ("color_reference", color_reference, COLOR_REFERENCES)):
            if value not in options:
                raise ValueError(f"{name} {value!r} is not one of {options}")
        if not math.isfinite(float(source_fps)):
            raise ValueError(f"source_fps must be a finite number, got {source_fps}")
        frames = frame_source(source_video, source_images, source_fps)
        reference = frames.read([0], int(width), int(height))[0].float() / 255
        y = condition_y(vae_encode(vae, condition_frames(reference, int(clip_length))))
        encode = clip_encoder(clip_vision)
        if encode is None:
            log.warning("InfiniteTalk Video to Video: no CLIP vision model connected; zero CLIP "
                        "tokens for every window (identity follows the VAE condition only)")
        fea = encode(reference[None]) if encode else torch.zeros(1, CLIP_TOKENS, CLIP_DIM)
        log.info("InfiniteTalk Video to Video: source %d frames at %.3f fps (%.2f s), %dx%d -> "
                 "%dx%d, past the end: %s, colour reference: %s", frames.num_frames, frames.fps,
                 frames.num_frames / frames.fps, frames.size[1], frames.size[0], width, height,
                 past_end, color_reference)
        cond = InfiniteTalkCond(
            reference=reference, y=y, clip_fea=fea, width=int(width), height=int(height),
            clip_frames=int(clip_length), motion_frames=int(motion_frames),
            source_size=frames.size,
            dubbing=DubbingSource(frames, vae, clip_vision, past_end, color_reference))
        return io.NodeOutput(cond)
