"""ComfyUI adapters of the pack. Add new node classes to NODE_CLASSES."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .model_info import WanVideoModelInfo
from .model_loader import WanVideoModelLoader

NODE_CLASSES: list[type[io.ComfyNode]] = [
    WanVideoModelLoader,
    WanVideoModelInfo,
]


class WanVideoInfiniteTalkExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
