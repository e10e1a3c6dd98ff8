"""API-format node dicts for the pack's graphs, shared by the example workflows and the server
tests: each function returns one node {"class_type", "inputs"}; links are [node_id, slot]."""
from __future__ import annotations


def node(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def image_to_video(image, vae, width: int, height: int, clip: int = 81, motion: int = 9,
                   clip_vision_output=None) -> dict:
    n = node("InfiniteTalkImageToVideo", start_image=image, vae=vae, width=width, height=height,
             clip_length=clip, motion_frames=motion)
    if clip_vision_output is not None:
        n["inputs"]["clip_vision_output"] = clip_vision_output
    return n


def audio_embeds(wav2vec2, audio, mode: str = "para", speaker_boxes: str = "", **extra) -> dict:
    return node("InfiniteTalkAudioEmbeds", wav2vec2=wav2vec2, audio=audio, mode=mode,
                speaker_boxes=speaker_boxes, **extra)


def model_loader(model: str, precision: str = "fp32", load_device: str = "main_device",
                 **extra) -> dict:
    return node("WanVideoModelLoader", model=model, base_precision=precision, attention="sdpa",
                load_device=load_device, **extra)


def multi_gpu(gpus: str = "all", mode: str = "auto", transport: str | None = None) -> dict:
    extra = {} if transport is None else {"transport": transport}
    return node("WanVideoMultiGPU", gpus=gpus, mode=mode, **extra)


def sampler(model, positive, negative, conditioning, audio_embeds, vae, steps: int = 1,
            seed: int = 0, text_guidance: float = 1.0, audio_guidance: float = 1.0,
            color_correction: float = 0.0, shift: float = 7.0, **extra) -> dict:
    return node("WanVideoInfiniteTalkSampler", model=model, positive=positive, negative=negative,
                conditioning=conditioning, audio_embeds=audio_embeds, vae=vae, steps=steps,
                shift=shift, text_guidance=text_guidance, audio_guidance=audio_guidance,
                scheduler="euler", seed=seed, color_correction=color_correction, max_frames=0,
                **extra)


def create_video(images, audio, fps: float = 25.0) -> dict:
    return node("CreateVideo", images=images, fps=fps, audio=audio)


def save_video(video, prefix: str, fmt: str = "auto", codec: str = "auto") -> dict:
    return node("SaveVideo", video=video, filename_prefix=prefix, format=fmt, codec=codec)
