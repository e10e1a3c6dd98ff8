"""InfiniteTalk Image to Video: start image + Wan VAE + CLIP vision -> INFINITETALK_COND."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from ..wanvideo.config import CLIP_DIM, CLIP_TOKENS
from .types import INFINITETALK_COND, InfiniteTalkCond

CATEGORY = "WanVideo InfiniteTalk"

log = logging.getLogger(__name__)


def wan_latent_format():
    import comfy.latent_formats

    return comfy.latent_formats.Wan21()


def vae_encode(vae, frames: torch.Tensor) -> torch.Tensor:
    """ComfyUI VAE on pixels [F, H, W, 3] 0..1 -> the model's normalised latents [1,16,F_lat,h,w]."""
    raw = vae.encode(frames[..., :3])
    if raw.ndim != 5 or raw.shape[1] != 16:
        raise ValueError(f"the VAE returned latents {tuple(raw.shape)}; a Wan 2.1 VAE "
                         "(16 latent channels, video) is needed")
    return wan_latent_format().process_in(raw.float().cpu())


def clip_features(clip_vision_output) -> torch.Tensor:
    if clip_vision_output is None:
        log.warning("InfiniteTalk Image to Video: no CLIP vision output connected; using zero "
                    "CLIP tokens (the image still conditions through the VAE latents, but "
                    "identity is usually weaker). Connect CLIPVisionEncode for real use.")
        return torch.zeros(1, CLIP_TOKENS, CLIP_DIM)
    fea = getattr(clip_vision_output, "penultimate_hidden_states", None)
    if fea is None:
        raise ValueError("the CLIP vision output has no penultimate_hidden_states; use "
                         "CLIPVisionEncode with a ViT-H CLIP vision model (crop 'center')")
    fea = fea.float().cpu()
    if fea.ndim == 2:
        fea = fea.unsqueeze(0)
    if fea.shape[-1] != CLIP_DIM:
        raise ValueError(f"CLIP vision tokens have width {fea.shape[-1]}; Wan2.1 I2V needs the "
                         f"ViT-H model (width {CLIP_DIM}, e.g. clip_vision_h.safetensors)")
    return fea[:1]


class InfiniteTalkImageToVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfiniteTalkImageToVideo",
            display_name="InfiniteTalk Image to Video",
            category=CATEGORY,
            description="Prepares the portrait for InfiniteTalk: resize to cover + centre crop, "
                        "VAE-encode it as the first frame of a clip, and take its CLIP vision "
                        "tokens.",
            inputs=[
                io.Image.Input("start_image", tooltip="The portrait to animate. Only the first "
                               "image of a batch is used; it is scaled to cover width x height "
                               "and centre-cropped."),
                io.Vae.Input("vae", tooltip="The Wan 2.1 VAE (e.g. wan_2.1_vae.safetensors "
                             "from VAELoader)."),
                io.Int.Input("width", default=832, min=16, max=4096, step=16,
                             tooltip="Output width in pixels, a multiple of 16. 832x480 / "
                                     "480x832 are the official 480p buckets (shift 7); "
                                     "1280x720 is 720p (shift 11)."),
                io.Int.Input("height", default=480, min=16, max=4096, step=16,
                             tooltip="Output height in pixels, a multiple of 16."),
                io.Int.Input("clip_length", default=81, min=5, max=257, step=4,
                             tooltip="Frames per generated window, 4n+1 (official: 81). Long "
                                     "videos are made of overlapping windows of this length."),
                io.Int.Input("motion_frames", default=9, min=1, max=256,
                             tooltip="Frames of the previous window that condition the next "
                                     "(official: 9); each window adds clip_length - "
                                     "motion_frames new frames."),
                io.ClipVisionOutput.Input(
                    "clip_vision_output", optional=True,
                    tooltip="CLIPVisionEncode of the start image with the ViT-H CLIP vision "
                            "model. Optional: without it zero tokens are used (a warning is "
                            "logged), which weakens identity."),
            ],
            outputs=[INFINITETALK_COND.Output(
                display_name="conditioning",
                tooltip="Reference image, its VAE condition and CLIP tokens, for the "
                        "WanVideo InfiniteTalk Sampler.")],
        )

    @classmethod
    def execute(cls, start_image, vae, width: int = 832, height: int = 480,
                clip_length: int = 81, motion_frames: int = 9,
                clip_vision_output=None) -> io.NodeOutput:
        from ..multitalk.pipeline import condition_frames, condition_y, fit_image, validate_size
        from ..wanvideo.memory import require_host

        # Ranges are ComfyUI's own validation (this node declares no validate_inputs, which
        # would switch it off); what a range cannot say is checked here, before any work.
        validate_size(width, height, clip_length, motion_frames)
        if not isinstance(start_image, torch.Tensor) or start_image.ndim != 4 \
                or start_image.shape[0] < 1 or start_image.shape[-1] < 3:
            raise ValueError("start_image must be an IMAGE batch [B, H, W, 3]")
        # Pixels of the clip plus the resize's working copies, before the VAE sees them.
        require_host(int(clip_length) * int(width) * int(height) * 3 * 4 * 3,
                     f"the image condition ({clip_length} frames at {width}x{height})",
                     "lower the resolution or clip_length")
        reference = fit_image(start_image[0].cpu(), int(width), int(height))
        latents = vae_encode(vae, condition_frames(reference, int(clip_length)))
        y = condition_y(latents)
        want = (int(clip_length) - 1) // 4 + 1
        if y.shape[2] != want or y.shape[-2:] != (height // 8, width // 8):
            raise ValueError(f"the VAE returned latents {tuple(latents.shape)} for "
                             f"{clip_length} frames of {width}x{height}; a Wan 2.1 VAE is needed")
        cond = InfiniteTalkCond(reference=reference, y=y, clip_fea=clip_features(clip_vision_output),
                                width=int(width), height=int(height),
                                clip_frames=int(clip_length), motion_frames=int(motion_frames),
                                source_size=(int(start_image.shape[1]), int(start_image.shape[2])))
        return io.NodeOutput(cond)
