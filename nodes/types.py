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
WAV2VEC2MODEL = io.Custom("WAV2VEC2MODEL")
INFINITETALK_PATCH = io.Custom("INFINITETALK_PATCH")
WANVIDLORA = io.Custom("WANVIDLORA")          # list of (name in models/loras, strength), in merge order


@dataclass
class InfiniteTalkCond:
    """Output of "InfiniteTalk Image to Video": the per-clip image condition.

    reference: [H, W, 3] 0..1, resized/cropped to width x height (colour-correction target).
    y: [1, 20, F_lat, h, w] mask (4 ch, 1 on latent frame 0) + normalised latents of the
       reference followed by clip_frames - 1 grey frames.
    clip_fea: [1, 257, 1280] CLIP vision penultimate hidden states (zeros when none was given).
    source_size: (height, width) of the portrait before its cover-and-crop; speaker masks drawn
       on the portrait go through the same transform (multitalk.framing.fit_masks).
    dubbing: set by InfiniteTalk Video to Video: every window is conditioned on its own source
       frame; reference / y / clip_fea above are then those of source frame 0.
    """

    reference: Any
    y: Any
    clip_fea: Any
    width: int
    height: int
    clip_frames: int = 81
    motion_frames: int = 9
    source_size: Optional[tuple] = None
    dubbing: Optional[Any] = None     # nodes.dubbing.DubbingSource in video-to-video mode


@dataclass
class InfiniteTalkAudio:
    """Output of "InfiniteTalk Audio Embeds": what the sampler needs from the speech.

    features: list (1 or 2 speakers) of wav2vec features [T, 12, 768], 25 rows per second.
    masks: [2, H, W] speaker masks for two speakers, else None. They span the portrait (whatever
           their resolution); the sampler puts them through the portrait's cover-and-crop.
    audio: the ComfyUI AUDIO dict ({"waveform" [B, C, S], "sample_rate"}) the video belongs to;
           the sampler trims it to the generated length.
    """

    features: list = field(default_factory=list)
    masks: Optional[Any] = None
    audio: Optional[dict] = None


@dataclass
class InfiniteTalkPatch:
    """Output of "InfiniteTalk Model Loader": a validated patch file, read at model load.

    info: multitalk.inject.detect_infinitetalk of its header (keys_found, blocks, speakers ...).
    """

    path: str
    name: str
    info: dict = field(default_factory=dict)


@dataclass
class BlockSwapArgs:
    """Output of "WanVideo BlockSwap": settings the sampler installs wanvideo.block_swap with.
    Every run applies them in full: on a model ComfyUI kept from an earlier prompt, the attached
    streamer is re-configured (wanvideo.block_swap.install), rebuilding only what changed.

    blocks_to_swap: last N blocks streamed from host RAM; -1 = auto (sized from free VRAM).
    prefetch: blocks copied ahead on the side stream (1..3; slots = prefetch + 1).
    offload_non_block: keep embeddings/head in host RAM too, moved in per forward.
    pin_memory: page-locked host masters (fast async copies; costs unpageable RAM).
    show_stats: log bytes moved / copy and wait times / peak VRAM after every forward.
    """

    blocks_to_swap: int = 20
    prefetch: int = 1
    offload_non_block: bool = False
    pin_memory: bool = True
    show_stats: bool = False

    def kwargs(self, tokens: int | None = None) -> dict:
        """Keyword arguments of wanvideo.block_swap.BlockSwap (device excluded). `tokens`: the
        latent sequence length of one window, needed by auto sizing."""
        return {"blocks_to_swap": "auto" if int(self.blocks_to_swap) < 0 else int(self.blocks_to_swap),
                "prefetch": int(self.prefetch), "offload_non_blocks": bool(self.offload_non_block),
                "pin": bool(self.pin_memory), "log_stats": bool(self.show_stats),
                "tokens": tokens}
