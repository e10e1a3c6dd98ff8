"""Small values that travel between the pack's nodes (ComfyUI custom socket types).

Kept minimal: plain dataclasses with tensors on the host, no per-run device state (ComfyUI caches
node outputs across prompts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from comfy_api.latest import io

INFINITETALK_COND = io.Custom("INFINITETALK_COND")
INFINITETALK_AUDIO = io.Custom("INFINITETALK_AUDIO")
BLOCKSWAPARGS = io.Custom("BLOCKSWAPARGS")


@dataclass
class InfiniteTalkCond:
    """Output of "InfiniteTalk Image to Video": the per-clip image condition.

    reference: [H, W, 3] 0..1, resized/cropped to width x height (colour-correction target).
    y: [1, 20, F_lat, h, w] mask (4 ch, 1 on latent frame 0) + normalised latents of the
       reference followed by clip_frames - 1 grey frames.
    clip_fea: [1, 257, 1280] CLIP vision penultimate hidden states (zeros when none was given).
    """

    reference: Any
    y: Any
    clip_fea: Any
    width: int
    height: int
    clip_frames: int = 81
    motion_frames: int = 9


@dataclass
class InfiniteTalkAudio:
    """Output of "InfiniteTalk Audio Embeds": what the sampler needs from the speech.

    features: list (1 or 2 speakers) of wav2vec features [T, 12, 768], 25 rows per second.
    masks: [2, H, W] speaker masks for two speakers, else None.
    audio: the ComfyUI AUDIO dict ({"waveform" [B, C, S], "sample_rate"}) the video belongs to;
           the sampler trims it to the generated length.
    """

    features: list = field(default_factory=list)
    masks: Optional[Any] = None
    audio: Optional[dict] = None
