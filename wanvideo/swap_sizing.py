"""BlockSwap policy: how many blocks to stream (docs/ARCHITECTURE.md §5).

Pure arithmetic plus one reading of free device memory; nothing here moves a tensor. The facade
(`block_swap.BlockSwap`) asks `auto_blocks_to_swap` whenever its settings say "auto": at attach and
at every re-configure, so a cached model re-sizes for each prompt's resolution and free memory.

Why there is no refinement from a measured step: the activation estimate is generous mostly at
large token counts, where a block's compute hides its copy (all 40 blocks swapped at 32,760
tokens cost 1.01x resident on an H100), while at small token counts, where copies show, the
estimate itself is small. Re-sizing mid-run from a measured peak would also hand the VAE decode
between windows less room; the gain was not worth that risk.
"""
from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

from . import placement
from .memory import device_available_bytes
from .swap_groups import module_tensors, non_block_tensors, unique_bytes

log = logging.getLogger(__name__)

MAX_PREFETCH = 3
DEFAULT_RESERVE_BYTES = 768 * 2 ** 20
CLIP_TOKENS = 257


def estimate_activation_bytes(tokens: int, dim: int, ffn_dim: int, dtype_bytes: int = 2,
                              context_tokens: int = 512 + CLIP_TOKENS, batch: int = 1) -> int:
    """Peak transient device memory of one forward, in bytes (an estimate, deliberately generous):

        batch * tokens * (dim * (32 + 4 * dtype_bytes) + 2 * ffn_dim * dtype_bytes)
      + batch * context_tokens * dim * (4 + 2 * dtype_bytes)

    Per token: the fp32 residual stream and the block's new residual (8*dim), the fp32 modulated
    norm and its temporaries plus the fp32 RoPE rotation of q and k (~24*dim), q/k/v/attention
    output in the compute dtype (4*dim*dtype_bytes), and the FFN hidden state with its GELU output
    (2*ffn_dim*dtype_bytes). Plus the embedded text+CLIP context. 14B, bf16, 32,760 tokens: ~7.4 GB."""
    per_token = dim * (32 + 4 * dtype_bytes) + 2 * ffn_dim * dtype_bytes
    return int(batch * (tokens * per_token + context_tokens * dim * (4 + 2 * dtype_bytes)))


def estimate_blocks_to_swap(free_bytes: int, block_bytes: Sequence[int], non_block_bytes: int,
                            activation_bytes: int, prefetch: int = 1, reserve_bytes: int = 0) -> int:
    """Smallest N (swap the last N blocks) whose device footprint fits in `free_bytes`:

        resident blocks + non-block params + activations + reserve
        + min(prefetch + 1, N) slots of the largest swapped block   <=   free_bytes

    Returns len(block_bytes) when even swapping everything does not fit (the caller warns)."""
    layers = len(block_bytes)
    budget = free_bytes - reserve_bytes - non_block_bytes - activation_bytes
    for n in range(layers + 1):
        resident = sum(block_bytes[:layers - n])
        slots = min(prefetch + 1, n) * max(block_bytes[layers - n:]) if n else 0
        if resident + slots <= budget:
            return n
    return layers


def model_bytes(model: nn.Module, device: torch.device) -> tuple[list[int], int, int]:
    """(bytes of each block, bytes of the non-block tensors, bytes already on `device`)."""
    blocks = [unique_bytes(module_tensors(b)) for b in model.blocks]
    non_block = unique_bytes(non_block_tensors(model))
    on_device = unique_bytes([(n, t) for n, t in placement.named_tensors(model)
                              if t.device == device])
    return blocks, non_block, on_device


def activation_bytes(model: nn.Module, tokens: int, batch: int = 1) -> int:
    cfg = model.config
    dtype = getattr(model, "dtype", torch.bfloat16)
    return estimate_activation_bytes(tokens, cfg.dim, cfg.ffn_dim,
                                     torch.empty((), dtype=dtype).element_size(),
                                     cfg.text_len + (CLIP_TOKENS if cfg.has_image_embedding else 0),
                                     batch)


def free_device_bytes(device: torch.device,
                      memory_info: Callable[[], tuple[int, int]] | None = None) -> int:
    """Free device memory: `memory_info()[0]` when given (tests inject numbers), else
    memory.device_available_bytes (driver free + the allocator's unused cache, within the
    per-process cap)."""
    if memory_info is not None:
        return int(memory_info()[0])
    return int(device_available_bytes(device) or 0)


def auto_blocks_to_swap(model: nn.Module, device: torch.device, tokens: int | None,
                        batch: int = 1, prefetch: int = 1,
                        reserve_bytes: int = DEFAULT_RESERVE_BYTES,
                        memory_info: Callable[[], tuple[int, int]] | None = None) -> int:
    """N for blocks_to_swap="auto": the smallest number of streamed blocks whose footprint, with
    the activations of a `tokens`-long forward, fits the free memory plus what the model already
    occupies on `device`. 0 on a device without memory figures (CPU) unless `memory_info` is given.
    Call it with no device slots held (BlockSwap releases them first)."""
    if device.type != "cuda" and memory_info is None:
        return 0
    if tokens is None:
        raise ValueError("blocks_to_swap='auto' needs tokens= (latent frames x H/16 x W/16)")
    free = free_device_bytes(device, memory_info)
    blocks, non_block, on_device = model_bytes(model, device)
    act = activation_bytes(model, tokens, batch)
    n = estimate_blocks_to_swap(free + on_device, blocks, non_block, act, prefetch, reserve_bytes)
    log.info("BlockSwap auto: %.2f GB free (+%.2f GB already placed), activations %.2f GB for "
             "%d tokens, swapping %d of %d blocks", free / 1e9, on_device / 1e9, act / 1e9,
             tokens, n, len(blocks))
    if n == len(blocks) and sum(blocks) > 0:
        min_slots = min(prefetch + 1, n) * max(blocks)
        if free + on_device < non_block + act + min_slots + reserve_bytes:
            log.warning("BlockSwap auto: even with every block streamed the estimate does not fit "
                        "(%.2f GB needed); expect out-of-memory errors at this resolution",
                        (non_block + act + min_slots + reserve_bytes) / 1e9)
    return n
