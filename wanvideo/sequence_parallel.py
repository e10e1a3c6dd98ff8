"""Sequence parallelism (Ulysses) for WanModel: each rank of a process group holds a contiguous
chunk of the patchified tokens and runs every block on that chunk only.

Only self-attention needs other ranks' tokens. Around it one all-to-all turns
[local tokens, all heads] into [all tokens, heads / world], attention runs over the full sequence
for those heads, and a second all-to-all turns the result back. Cross-attention (text, CLIP,
audio) is per query token, so it runs on the local chunk without communication. The head runs per
token too; only its narrow output (out_dim * patch volume channels) is gathered at the end.

The sequence is padded to a multiple of the world size. Only the last chunk holds padding, so
after the all-to-all the padding sits at the end of the gathered sequence: attention simply uses
the first `length` keys and values, and padding tokens never influence a real token. Their own
outputs are garbage that the final gather drops.

Only torch.distributed collectives are used (all_to_all_single, all_gather, all_reduce); gloo
supports all three on CPU, NCCL on CUDA.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class RankGroup:
    """group: a torch.distributed process group (None: the default group); rank/world: this
    process's rank in that group and the group's size."""

    group: Optional[Any]
    rank: int
    world: int

    @classmethod
    def from_group(cls, group=None):
        return cls(group, dist.get_rank(group), dist.get_world_size(group))


@dataclass(frozen=True)
class SequenceParallel(RankGroup):
    """Which ranks share one forward. Set it as `model.sequence_parallel` (None: one process)."""

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} does not fit a group of {self.world}")

    def check_heads(self, num_heads: int) -> None:
        if num_heads % self.world:
            raise ValueError(f"sequence parallel degree {self.world} must divide the "
                             f"{num_heads} attention heads")

    def shard(self, grid: tuple[int, int, int]) -> "TokenShard":
        return TokenShard(self, tuple(int(g) for g in grid))


@dataclass(frozen=True)
class TokenShard:
    """One forward's split of the token grid over the ranks of `sp`."""

    sp: SequenceParallel
    grid: tuple[int, int, int]

    @property
    def length(self) -> int:
        f, h, w = self.grid
        return f * h * w

    @property
    def frame_tokens(self) -> int:
        return self.grid[1] * self.grid[2]

    @property
    def chunk(self) -> int:
        return math.ceil(self.length / self.sp.world)

    @property
    def start(self) -> int:
        """Global index of this rank's first token."""
        return self.sp.rank * self.chunk

    @property
    def real(self) -> int:
        """How many of this rank's tokens are real (the rest is padding)."""
        return max(0, min(self.chunk, self.length - self.start))

    def local(self, t: torch.Tensor, dim: int, fill: float = 0.0) -> torch.Tensor:
        """This rank's chunk of `t` along `dim` (full length), padded with `fill` at the end."""
        piece = t.narrow(dim, min(self.start, t.shape[dim]), self.real)
        missing = self.chunk - self.real
        if missing:
            shape = list(piece.shape)
            shape[dim] = missing
            piece = torch.cat([piece, piece.new_full(shape, fill)], dim=dim)
        return piece.contiguous()

    def frame_segments(self) -> list[tuple[int, int, int]]:
        """(latent frame, local start, local end) for the real tokens of this chunk, in order."""
        s, out = self.frame_tokens, []
        lo, end = self.start, self.start + self.real
        while lo < end:
            frame = lo // s
            hi = min(end, (frame + 1) * s)
            out.append((frame, lo - self.start, hi - self.start))
            lo = hi
        return out

    # ------------------------------------------------------------------- collectives

    def _all_to_all(self, t: torch.Tensor) -> torch.Tensor:
        """all_to_all over dim 0 of t [world, ...]: block j goes to rank j; the result's block j
        came from rank j."""
        t = t.contiguous()
        out = torch.empty_like(t)
        dist.all_to_all_single(out, t, group=self.sp.group)
        return out

    def heads_to_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """[B, chunk, *M, H, D] (local tokens, all heads) -> [B, world*chunk, *M, H/world, D]
        (all tokens in global order, this rank's heads)."""
        w = self.sp.world
        b, n, *mid, h, d = t.shape
        blocks = t.reshape(b, n, -1, w, h // w, d).permute(3, 0, 1, 2, 4, 5)
        got = self._all_to_all(blocks)                  # [w (token chunk), B, n, M, H/w, D]
        return got.transpose(0, 1).reshape(b, w * n, *mid, h // w, d)

    def tokens_to_heads(self, t: torch.Tensor) -> torch.Tensor:
        """Inverse of heads_to_tokens: [B, world*chunk, H/world, D] -> [B, chunk, H, D]."""
        w = self.sp.world
        b, _, hl, d = t.shape
        blocks = t.reshape(b, w, self.chunk, hl, d).transpose(0, 1)
        got = self._all_to_all(blocks)                  # [w (head block), B, chunk, H/w, D]
        return got.permute(1, 2, 0, 3, 4).reshape(b, self.chunk, w * hl, d)

    def _all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.contiguous()
        parts = [torch.empty_like(t) for _ in range(self.sp.world)]
        dist.all_gather(parts, t, group=self.sp.group)
        return parts

    def gather_tokens(self, t: torch.Tensor) -> torch.Tensor:
        """[B, chunk, C] on every rank -> [B, length, C] (padding dropped) on every rank."""
        return torch.cat(self._all_gather(t), dim=1)[:, :self.length]

    def gather_heads(self, t: torch.Tensor) -> torch.Tensor:
        """[B, N, H/world, D] (this rank's heads) -> [B, N, H, D] (all heads, in order)."""
        return torch.cat(self._all_gather(t), dim=2)

    def all_reduce(self, t: torch.Tensor, op) -> torch.Tensor:
        t = t.contiguous()
        dist.all_reduce(t, op=op, group=self.sp.group)
        return t


# The shard of the forward now running its blocks in this thread (None: an unsplit forward).
_RUNNING: contextvars.ContextVar = contextvars.ContextVar("wanvideo_token_shard", default=None)


@contextlib.contextmanager
def sharded_forward(shard: TokenShard):
    """While active, per-tensor fp8 activation scales are agreed over the shard's group
    (agree_scale, called by quant_kernels): one process scales a tensor by the max over all its
    tokens, so every rank must use the max over every rank's tokens, or the same token is
    rounded differently and the split output drifts from the single-process one."""
    token = _RUNNING.set(shard)
    try:
        yield
    finally:
        _RUNNING.reset(token)


def agree_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` (0-d, per tensor, larger = coarser) as the maximum over the ranks that share the
    running forward; unchanged outside a sharded forward. Every rank quantizes the same layers
    in the same order, so these all_reduces pair up."""
    shard = _RUNNING.get()
    if shard is None:
        return scale
    agreed = scale.reshape(1).clone()   # never write into a layer's stored input scale
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=shard.sp.group)
    return agreed.reshape(())


def split_rotations(shard: TokenShard, rot: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the RoPE rotations [L, 1, D/2] (complex): every token keeps its global
    position; padding tokens get the identity rotation."""
    return shard.local(rot, 0, fill=1.0)
