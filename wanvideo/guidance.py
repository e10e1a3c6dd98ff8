"""Classifier-free guidance over text and audio (InfiniteTalk), as 3, 2 or 1 model passes.

Conditions, as in the official generate loop:
    cond     = positive text + audio
    no_text  = negative text + audio
    no_audio = positive text + zero audio   (audio_proj of zeros, one speaker)
    uncond   = negative text + zero audio

    3 passes:  uncond + s_t * (cond - no_text) + s_a * (no_text - uncond)
    2 passes (s_t == 1):  no_audio + s_a * (cond - no_audio)
    1 pass (s_t == s_a == 1):  cond

One exact shortcut beyond the official code: with s_a == 1 (and s_t != 1) the 3-pass formula
reduces algebraically to no_text + s_t * (cond - no_text), so the uncond pass is skipped.
Scale equality uses math.isclose, like the official code.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch


@dataclass(frozen=True)
class PassSpec:
    """One model evaluation: which text context and whether the real audio is used."""

    name: str            # "cond", "no_text", "no_audio" or "uncond"
    negative_text: bool  # True: the negative prompt's context
    audio: bool          # False: zero audio ("no audio")


COND = PassSpec("cond", negative_text=False, audio=True)
NO_TEXT = PassSpec("no_text", negative_text=True, audio=True)
NO_AUDIO = PassSpec("no_audio", negative_text=False, audio=False)
UNCOND = PassSpec("uncond", negative_text=True, audio=False)


def _is_one(scale: float) -> bool:
    return math.isclose(float(scale), 1.0)


def plan_passes(text_scale: float, audio_scale: float) -> list[PassSpec]:
    """Which passes the combination needs, cond first."""
    if _is_one(text_scale):
        return [COND] if _is_one(audio_scale) else [COND, NO_AUDIO]
    if _is_one(audio_scale):
        return [COND, NO_TEXT]
    return [COND, NO_TEXT, UNCOND]


def combine(outputs: Sequence[torch.Tensor], plan: Sequence[PassSpec],
            text_scale: float, audio_scale: float) -> torch.Tensor:
    """Combine the pass outputs (same order as `plan`) into one guided prediction."""
    if len(outputs) != len(plan):
        raise ValueError(f"{len(outputs)} outputs for a plan of {len(plan)} passes")
    by_name = {spec.name: out for spec, out in zip(plan, outputs)}
    names = tuple(spec.name for spec in plan)
    s_t, s_a = float(text_scale), float(audio_scale)
    cond = by_name["cond"]
    if names == ("cond",):
        return cond
    if names == ("cond", "no_audio"):
        no_audio = by_name["no_audio"]
        return no_audio + s_a * (cond - no_audio)
    if names == ("cond", "no_text"):
        no_text = by_name["no_text"]
        return no_text + s_t * (cond - no_text)
    if names == ("cond", "no_text", "uncond"):
        no_text, uncond = by_name["no_text"], by_name["uncond"]
        return uncond + s_t * (cond - no_text) + s_a * (no_text - uncond)
    raise ValueError(f"unsupported pass plan {names}")


@dataclass(frozen=True)
class Guidance:
    """Scales plus their plan, handed to the sampling loop as one object."""

    text_scale: float = 5.0
    audio_scale: float = 4.0

    @property
    def passes(self) -> list[PassSpec]:
        return plan_passes(self.text_scale, self.audio_scale)

    def combine(self, outputs: Sequence[torch.Tensor]) -> torch.Tensor:
        return combine(outputs, self.passes, self.text_scale, self.audio_scale)
