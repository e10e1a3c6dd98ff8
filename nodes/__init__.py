"""ComfyUI adapters of the pack. Add new node classes to NODE_CLASSES."""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from .audio_embeds import InfiniteTalkAudioEmbeds, InfiniteTalkAudioInfo, Wav2Vec2ModelLoader
from .block_swap import WanVideoBlockSwap
from .conditioning import InfiniteTalkImageToVideo
from .dubbing import InfiniteTalkVideoToVideo
from .model_info import WanVideoModelInfo
from .model_loader import WanVideoModelLoader
from .model_patches import InfiniteTalkModelLoader, WanVideoLoraSelect
from .multi_gpu import WanVideoMultiGPU
from .sampler import WanVideoInfiniteTalkSampler
from .text_embeds import WanVideoLoadTextEmbeds, WanVideoSaveTextEmbeds

NODE_CLASSES: list[type[io.ComfyNode]] = [
    WanVideoModelLoader,
    WanVideoModelInfo,
    InfiniteTalkImageToVideo,
    InfiniteTalkVideoToVideo,
    WanVideoSaveTextEmbeds,
    WanVideoLoadTextEmbeds,
    WanVideoInfiniteTalkSampler,
    InfiniteTalkModelLoader,
    WanVideoLoraSelect,
    WanVideoBlockSwap,
    WanVideoMultiGPU,
    Wav2Vec2ModelLoader,
    InfiniteTalkAudioEmbeds,
    InfiniteTalkAudioInfo,
]


class WanVideoInfiniteTalkExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODE_CLASSES)
