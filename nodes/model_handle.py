"""The value that travels on a WANVIDEOMODEL socket.

A small wrapper rather than the bare module, so later nodes know where the weights live and where
to park them, and can read what the loader detected without re-inspecting the model. It must not
hold per-run state (slots, stream events, audio): ComfyUI caches it across prompts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class WanVideoModelHandle:
    model: Any                      # wanvideo.model.WanModel
    report: dict = field(default_factory=dict)  # what the loader detected (inspect JSON keys)
    device: Any = None              # torch.device the weights were loaded to
    offload_device: Any = None      # torch.device to park weights on (ComfyUI's unet offload device)
    name: str = ""                  # the checkpoint's name in models/diffusion_models
    # How the loader made `model` (resolved files + options): multi-GPU workers load their own
    # copies from it (multitalk.multi_gpu_worker.load_checkpoint keywords).
    load_spec: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The report plus where the model lives; JSON-friendly. Files appear as ComfyUI lists
        them, never as server paths (this goes to every client)."""
        out = dict(self.report)
        out.setdefault("file", self.name)
        out["device"] = str(self.device)
        out["offload_device"] = str(self.offload_device)
        return out
