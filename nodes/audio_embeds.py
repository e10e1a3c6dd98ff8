"""Speech -> InfiniteTalk audio conditioning: Wav2Vec2 Model Loader, InfiniteTalk Audio Embeds
and InfiniteTalk Audio Info. The recipe (mono 16 kHz, -23 LUFS, wav2vec2 layers at 25 rows per
second) lives in multitalk.audio_features; two-speaker tracks and masks in multitalk.speakers."""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from comfy_api.latest import io, ui

from ..multitalk.long_video import FPS
from .model_files import register_folders, wav2vec2_choices, wav2vec2_path
from .types import INFINITETALK_AUDIO, WAV2VEC2MODEL, InfiniteTalkAudio
from .validation import not_listed

CATEGORY = "WanVideo InfiniteTalk"
MODES = ["para", "add"]
MASK_SIZE = 512           # default/box masks are drawn at this size; the model resizes them

log = logging.getLogger(__name__)


@dataclass
class Wav2Vec2Model:
    """The value on a WAV2VEC2MODEL socket: the encoder (kept on ComfyUI's offload device
    between runs) and where it came from."""

    encoder: Any
    name: str
    path: str
    offload_device: Any = None


class Wav2Vec2ModelLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        register_folders()
        return io.Schema(
            node_id="Wav2Vec2ModelLoader",
            display_name="Wav2Vec2 Model Loader",
            category=CATEGORY,
            description="Loads the wav2vec2 speech encoder InfiniteTalk was trained with "
                        "(chinese-wav2vec2-base) from models/wav2vec2.",
            inputs=[io.Combo.Input(
                "model", options=wav2vec2_choices(),
                tooltip="A folder in models/wav2vec2 with config.json and model.safetensors "
                        "(e.g. TencentGameMate/chinese-wav2vec2-base), or a single .safetensors "
                        "file there (its configuration is inferred from the shapes).")],
            outputs=[WAV2VEC2MODEL.Output(
                display_name="wav2vec2",
                tooltip="The speech encoder, for InfiniteTalk Audio Embeds.")],
        )

    @classmethod
    def validate_inputs(cls, model=None) -> bool | str:
        if model is None:
            return True
        return not_listed(model, wav2vec2_choices(), "models/wav2vec2", "wav2vec2 model") or True

    @classmethod
    def execute(cls, model: str) -> io.NodeOutput:
        import comfy.model_management as mm
        from safetensors import SafetensorError

        from ..multitalk.wav2vec2 import load_wav2vec2

        path = wav2vec2_path(model)
        offload = mm.unet_offload_device()
        try:
            encoder = load_wav2vec2(path, device=offload, dtype=torch.float32)
        except (ValueError, KeyError, OSError, SafetensorError, RuntimeError) as e:
            msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
            msg = msg.split(": ", 1)[1] if msg.startswith(os.path.basename(path) + ": ") else msg
            raise ValueError(f"{model} is not a usable wav2vec2 model: {msg}") from None
        cfg = encoder.config if hasattr(encoder, "config") else None
        log.info("Wav2Vec2 Model Loader: %s (%s)", model,
                 f"hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers" if cfg else "loaded")
        return io.NodeOutput(Wav2Vec2Model(encoder=encoder, name=model, path=path,
                                           offload_device=offload))


def _audio_dict(audio, label: str) -> tuple[torch.Tensor, int]:
    try:
        wave, rate = audio["waveform"], int(audio["sample_rate"])
    except (TypeError, KeyError):
        raise ValueError(f"{label}: expected a ComfyUI AUDIO (from LoadAudio)") from None
    if not isinstance(wave, torch.Tensor) or wave.ndim != 3 or wave.shape[-1] == 0:
        raise ValueError(f"{label}: waveform must be [batch, channels, samples] and not empty, "
                         f"got {tuple(getattr(wave, 'shape', ()))}")
    return wave, rate


def _one_mask(mask, label: str) -> torch.Tensor:
    m = mask if isinstance(mask, torch.Tensor) else torch.as_tensor(mask)
    if m.ndim == 3:
        m = m[0]
    if m.ndim != 2:
        raise ValueError(f"{label}: expected a MASK [H, W] or [B, H, W], got {tuple(m.shape)}")
    if not bool((m > 0.5).any()):
        raise ValueError(f"{label} is empty: paint the speaker's region")
    return m.float().cpu()


def parse_boxes(text: str) -> list[tuple[float, ...]] | None:
    """'l,t,r,b; l,t,r,b' (fractions 0..1 of the portrait) -> two boxes; '' -> None."""
    text = (text or "").strip()
    if not text:
        return None
    boxes = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            box = tuple(float(v) for v in re.split(r"[,\s]+", part) if v)
        except ValueError:
            raise ValueError(f"speaker_boxes: {part!r} is not four numbers") from None
        if len(box) != 4 or not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"speaker_boxes: {part!r} must be left,top,right,bottom as "
                             "fractions 0..1 of the frame")
        boxes.append(box)
    if len(boxes) != 2:
        raise ValueError(f"speaker_boxes: two boxes separated by ';' are needed, got {len(boxes)}")
    return boxes


def speaker_masks_for(n_speakers: int, mask_1=None, mask_2=None, boxes=None) -> torch.Tensor | None:
    from ..multitalk.speakers import speaker_masks

    if n_speakers == 1:
        return None
    if (mask_1 is None) != (mask_2 is None):
        raise ValueError("two speakers need both mask_1 and mask_2 (or neither: then "
                         "speaker_boxes or the default left/right halves are used)")
    if mask_1 is not None:
        m1, m2 = _one_mask(mask_1, "mask_1"), _one_mask(mask_2, "mask_2")
        if m1.shape != m2.shape:
            raise ValueError(f"mask_1 {tuple(m1.shape)} and mask_2 {tuple(m2.shape)} differ in "
                             "size; draw both on the portrait (same width x height)")
        return speaker_masks(2, m1.shape[0], m1.shape[1], masks=torch.stack([m1, m2]))
    return speaker_masks(2, MASK_SIZE, MASK_SIZE, boxes=boxes)


def _run_on_device(encoder, offload, fn):
    """Run `fn(device)` with the encoder on ComfyUI's torch device, parking it again after."""
    import comfy.model_management as mm

    from ..wanvideo import placement

    device = mm.get_torch_device()
    moved = next(encoder.parameters()).device != torch.device(device)
    if moved:
        placement.move_module(encoder, device)
    try:
        return fn(device)
    finally:
        if moved:
            placement.move_module(encoder, offload or torch.device("cpu"))


class InfiniteTalkAudioEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfiniteTalkAudioEmbeds",
            display_name="InfiniteTalk Audio Embeds",
            category=CATEGORY,
            description="Turns speech into InfiniteTalk's audio conditioning: wav2vec2 features "
                        "at the video rate (fixed 25 fps, 25 feature rows per second of audio), "
                        "one track per speaker, plus speaker masks for two speakers. The video "
                        "is as long as the audio.",
            inputs=[
                WAV2VEC2MODEL.Input("wav2vec2", tooltip="From Wav2Vec2 Model Loader."),
                io.Audio.Input("audio", tooltip="Speech of speaker 1 (any sample rate, mono or "
                               "stereo; from LoadAudio). At least 0.04 s (one frame at 25 fps)."),
                io.Combo.Input("mode", options=MODES, default="para",
                               tooltip="Only with two speakers. para: both tracks play at the "
                                       "same time (shorter one padded with silence). add: "
                                       "speaker 1 talks, then speaker 2."),
                io.Audio.Input("audio_2", optional=True,
                               tooltip="Speech of speaker 2. Connecting it switches to "
                                       "two-speaker mode (use the multi-speaker InfiniteTalk "
                                       "patch)."),
                io.Mask.Input("mask_1", optional=True,
                              tooltip="Two speakers: region of speaker 1 on the portrait "
                                      "(white = speaker). Give both masks, same size. The "
                                      "sampler crops them exactly as the portrait is cropped."),
                io.Mask.Input("mask_2", optional=True,
                              tooltip="Two speakers: region of speaker 2, same size as mask_1."),
                io.String.Input("speaker_boxes", default="", optional=True,
                                tooltip="Two speakers without masks: 'left,top,right,bottom; "
                                        "left,top,right,bottom' as fractions 0..1 of the "
                                        "portrait (before its crop to the video size). Empty "
                                        "= left and right halves of the portrait."),
            ],
            outputs=[INFINITETALK_AUDIO.Output(
                display_name="audio_embeds",
                tooltip="wav2vec2 features per speaker, masks and the audio of the video, for "
                        "the WanVideo InfiniteTalk Sampler.")],
        )

    @classmethod
    def execute(cls, wav2vec2, audio, mode: str = "para", audio_2=None, mask_1=None,
                mask_2=None, speaker_boxes: str = "") -> io.NodeOutput:
        from ..multitalk.audio_features import SAMPLE_RATE, prepare_speech, wav2vec_features
        from ..multitalk.speakers import combine_tracks, require_tracks

        if mode not in MODES:
            raise ValueError(f"mode {mode!r} is not one of {MODES}")
        encoder = getattr(wav2vec2, "encoder", None)
        if encoder is None:
            raise ValueError("wav2vec2: expected a model from Wav2Vec2 Model Loader")
        boxes = parse_boxes(speaker_boxes)
        wants_two = audio_2 is not None or mask_1 is not None or mask_2 is not None or boxes
        n_speakers = 2 if wants_two else 1
        try:
            require_tracks(1 if audio_2 is None else 2, n_speakers)
        except ValueError as e:
            given = [n for n, v in (("mask_1", mask_1), ("mask_2", mask_2),
                                    ("speaker_boxes", boxes)) if v is not None]
            raise ValueError(f"{', '.join(given)} set but audio_2 is not connected: {e}") from None
        inputs = [("audio", audio)] + ([("audio_2", audio_2)] if audio_2 is not None else [])
        tracks = []
        for label, a in inputs:
            wave, rate = _audio_dict(a, label)
            try:
                tracks.append(prepare_speech(wave, rate))
            except ValueError as e:
                raise ValueError(f"{label}: {e}") from None
        masks = speaker_masks_for(n_speakers, mask_1, mask_2, boxes)
        tracks = combine_tracks(tracks, mode)
        features = _run_on_device(
            encoder, getattr(wav2vec2, "offload_device", None),
            lambda device: [wav2vec_features(encoder, t, device) for t in tracks])
        if n_speakers == 1:
            video_audio = audio
        else:  # the two speakers' prepared tracks, mixed: what the video is lip-synced to
            mix = torch.from_numpy(sum(tracks)).clamp(-1.0, 1.0)
            video_audio = {"waveform": mix.reshape(1, 1, -1).contiguous(), "sample_rate": SAMPLE_RATE}
        log.info("InfiniteTalk Audio Embeds: %d speaker(s)%s, %d frames (%.2f s at %d fps), "
                 "features %s", n_speakers, f", mode {mode}" if n_speakers == 2 else "",
                 features[0].shape[0], features[0].shape[0] / FPS, FPS,
                 [tuple(f.shape) for f in features])
        return io.NodeOutput(InfiniteTalkAudio(features=features, masks=masks, audio=video_audio))


def embeds_summary(embeds) -> dict:
    feats = list(getattr(embeds, "features", None) or [])
    masks = getattr(embeds, "masks", None)
    audio = getattr(embeds, "audio", None)
    out = {"speakers": len(feats), "features": [list(f.shape) for f in feats],
           "frames": int(feats[0].shape[0]) if feats else 0, "fps": FPS,
           "masks": list(masks.shape) if masks is not None else None}
    out["seconds"] = out["frames"] / FPS
    if audio is not None:
        out["audio"] = {"sample_rate": int(audio["sample_rate"]),
                        "shape": list(audio["waveform"].shape),
                        "seconds": audio["waveform"].shape[-1] / int(audio["sample_rate"])}
    return out


class InfiniteTalkAudioInfo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="InfiniteTalkAudioInfo",
            display_name="InfiniteTalk Audio Info",
            category=CATEGORY,
            description="Shows what InfiniteTalk Audio Embeds produced: speakers, feature "
                        "shapes, frames and seconds of video, masks and the audio.",
            inputs=[INFINITETALK_AUDIO.Input(
                "audio_embeds", tooltip="From InfiniteTalk Audio Embeds.")],
            outputs=[io.String.Output(display_name="json", tooltip="The summary as JSON text.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, audio_embeds) -> io.NodeOutput:
        text = json.dumps(embeds_summary(audio_embeds), indent=2)
        return io.NodeOutput(text, ui=ui.PreviewText(text))
