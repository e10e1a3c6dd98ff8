"""WanVideo BlockSwap: settings for streaming transformer blocks from host RAM (the sampler
installs wanvideo.block_swap.BlockSwap with them)."""
from __future__ import annotations

from comfy_api.latest import io

from .types import BLOCKSWAPARGS, BlockSwapArgs

CATEGORY = "WanVideo InfiniteTalk"
MAX_PREFETCH = 3  # wanvideo.block_swap.MAX_PREFETCH (not imported: schema stays torch-free)


class WanVideoBlockSwap(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="WanVideoBlockSwap",
            display_name="WanVideo BlockSwap",
            category=CATEGORY,
            description="Runs a model larger than the GPU: the last N transformer blocks stay "
                        "in host RAM and are copied to the GPU just before they run, overlapped "
                        "with compute. Connect to the sampler's block_swap_args; load the model "
                        "with load_device offload_device.",
            inputs=[
                io.Int.Input(
                    "blocks_to_swap", default=20, min=-1, max=100,
                    tooltip="How many of the last transformer blocks to stream from RAM (Wan2.1 "
                            "14B has 40). -1 = auto: the smallest number that fits the free "
                            "VRAM for the requested resolution and clip length. More blocks = "
                            "less VRAM, slower steps. The sampler rejects values larger than "
                            "the model's block count."),
                io.Int.Input(
                    "prefetch", default=1, min=1, max=MAX_PREFETCH,
                    tooltip="Blocks copied ahead of the one computing (side stream). 1 hides "
                            "the copy when a block's compute takes longer than its transfer; "
                            "2-3 smooth out uneven PCIe speed at one extra block of VRAM each."),
                io.Boolean.Input(
                    "offload_non_block", default=False,
                    tooltip="Also keep the non-block weights (embeddings, head, InfiniteTalk "
                            "audio projection; about 0.5 GB for 14B) in RAM and move them in "
                            "for each forward. For the smallest GPUs."),
                io.Boolean.Input(
                    "pin_memory", default=True,
                    tooltip="Keep the swapped blocks in pinned (page-locked) host RAM so copies "
                            "run asynchronously at full PCIe speed. Cost: pinned RAM equal to "
                            "the swapped blocks' size, which the OS cannot page out. Turn off "
                            "on machines short of RAM; transfers are then about 3-7x slower."),
                io.Boolean.Input(
                    "show_stats", default=False,
                    tooltip="Log, after every model forward, the bytes moved, copy time, time "
                            "the GPU waited for copies, and peak VRAM."),
            ],
            outputs=[BLOCKSWAPARGS.Output(
                display_name="block_swap_args",
                tooltip="BlockSwap settings for the WanVideo InfiniteTalk Sampler.")],
        )

    @classmethod
    def execute(cls, blocks_to_swap: int = 20, prefetch: int = 1, offload_non_block: bool = False,
                pin_memory: bool = True, show_stats: bool = False) -> io.NodeOutput:
        if int(blocks_to_swap) < -1:
            raise ValueError(f"blocks_to_swap must be -1 (auto) or >= 0, got {blocks_to_swap}")
        if not 1 <= int(prefetch) <= MAX_PREFETCH:
            raise ValueError(f"prefetch must be 1..{MAX_PREFETCH}, got {prefetch}")
        return io.NodeOutput(BlockSwapArgs(
            blocks_to_swap=int(blocks_to_swap), prefetch=int(prefetch),
            offload_non_block=bool(offload_non_block), pin_memory=bool(pin_memory),
            show_stats=bool(show_stats)))
