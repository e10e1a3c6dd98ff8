"""One window's denoising as a value: what `sample_window` needs, independent of where it runs.

The window loop (pipeline.py) builds a WindowJob per window and hands it to a window sampler:
`run_window` here in this process, or the multi-GPU runtime (multi_gpu.py), whose workers call
the same `run_window` with their sequence / guidance split. One function on both sides is what
makes the split output equal to the single-process one.

Every tensor is on the host or on the caller's device; run_window moves them to `device`, the
way the single-process loop always did (noise and motion latents in fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..wanvideo.guidance import Guidance, PassSpec
from ..wanvideo.sampling import PassRunner, SamplingCallbacks, sample_window
from .audio_proj import AudioInput


@dataclass
class WindowJob:
    """noise / motion: [1, 16, F_lat, h, w] and [1, 16, M, h, w]; y, clip_fea, positive,
    negative: the model's conditions for this window; audio: this window's AudioInput."""

    noise: torch.Tensor
    sigmas: list
    solver: str
    text_scale: float
    audio_scale: float
    motion: torch.Tensor
    y: torch.Tensor
    clip_fea: torch.Tensor
    positive: torch.Tensor
    negative: torch.Tensor
    audio: AudioInput
    label: str = ""            # "window 2/5", for messages
    preview: bool = False      # whether the caller wants x0 estimates (multi-GPU: sent back)

    @property
    def guidance(self) -> Guidance:
        return Guidance(self.text_scale, self.audio_scale)

    @property
    def steps(self) -> int:
        return len(self.sigmas) - 1

    def to_host(self) -> "WindowJob":
        """A copy whose tensors live on the host (what travels to other processes)."""
        cpu = (lambda t: None if t is None else t.detach().cpu())
        audio = AudioInput(cpu(self.audio.features), cpu(self.audio.masks))
        return WindowJob(cpu(self.noise), list(self.sigmas), self.solver, self.text_scale,
                         self.audio_scale, cpu(self.motion), cpu(self.y), cpu(self.clip_fea),
                         cpu(self.positive), cpu(self.negative), audio, self.label, self.preview)


def make_model_fn(model, job: WindowJob, device) -> Callable:
    """model_fn(x, t, pass) for sample_window: positive or negative text, real or silent audio."""
    pos, neg = job.positive.to(device), job.negative.to(device)
    clip_fea, y = job.clip_fea.to(device), job.y.to(device)
    audio, silent = job.audio, job.audio.silent()

    def model_fn(x: torch.Tensor, t: float, spec: PassSpec) -> torch.Tensor:
        tt = torch.full((x.shape[0],), float(t), device=x.device, dtype=torch.float32)
        with torch.no_grad():
            out = model(x, tt, neg if spec.negative_text else pos, clip_fea=clip_fea, y=y,
                        audio=audio if spec.audio else silent)
        return out.float()

    return model_fn


def run_window(model, job: WindowJob, device, callbacks: Optional[SamplingCallbacks] = None,
               run_passes: Optional[PassRunner] = None) -> torch.Tensor:
    """Denoise one window on `model` at `device`; returns the latents (fp32, on `device`)."""
    noise = job.noise.to(device=device, dtype=torch.float32)
    return sample_window(make_model_fn(model, job, device), noise, job.sigmas, solver=job.solver,
                         guidance=job.guidance, motion_latents=job.motion.to(device),
                         callbacks=callbacks, run_passes=run_passes)


WindowSampler = Callable[[WindowJob, SamplingCallbacks], torch.Tensor]
