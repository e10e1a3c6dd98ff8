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

The all-to-alls are hidden behind compute (ulysses.HeadExchange): q travels while k is computed
and k while v is; each rank's heads are split into `pieces`, so piece p + 1 travels while
attention runs on piece p; each piece's outputs for the other ranks travel while its attention
runs for this rank's own tokens. Received pieces are read in place as views (the alignment guard
accepts them). How the bytes move is SequenceParallel.transport (peer_copy): the GPUs' copy
engines through torch's symmetric memory, or torch.distributed send/recv (NCCL, gloo on CPU).
Gathers and all_reduces are torch.distributed collectives.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from . import peer_copy
from .ulysses import HeadExchange


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


# Head pieces per rank for the overlapped all-to-all; bench/multigpu.py compares 1 (no overlap)
# with more in one run (docs/BENCHMARKS.md).
DEFAULT_PIECES = 2
# How self-attention's inputs travel (SequenceParallel.by_keys): heads (Ulysses, the default:
# bit-identical to one process) or keys (opt-in; docs/MULTI_GPU.md has the measured trade-off).
EXCHANGES = ("heads", "keys")


@dataclass(frozen=True)
class SequenceParallel(RankGroup):
    """Which ranks share one forward. Set it as `model.sequence_parallel` (None: one process).
    `pieces`: into how many head groups each rank's attention is cut so that communication of
    one overlaps attention of another (1: one all-to-all each way, nothing overlapped); a count
    that does not divide a rank's heads is lowered to the largest one that does."""

    pieces: int = DEFAULT_PIECES
    exchange: str = "heads"
    transport: str = "auto"

    @classmethod
    def from_group(cls, group=None, pieces: int = DEFAULT_PIECES, exchange: str = "heads",
                   transport: str = "auto"):
        return cls(group, dist.get_rank(group), dist.get_world_size(group), pieces, exchange,
                   transport)

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} does not fit a group of {self.world}")
        if self.pieces < 1:
            raise ValueError(f"pieces must be at least 1, got {self.pieces}")
        if self.exchange not in EXCHANGES:
            raise ValueError(f"exchange {self.exchange!r} is not one of {EXCHANGES}")
        if self.transport not in peer_copy.TRANSPORTS:
            raise ValueError(f"transport {self.transport!r} is not one of {peer_copy.TRANSPORTS}")

    def by_keys(self, sdpa: bool) -> bool:
        """Whether self-attention exchanges keys/values (TokenShard.attention_by_keys) instead of
        heads (TokenShard.attention). `sdpa`: the unsplit attention would run PyTorch SDPA (the
        key exchange needs its log-sum-exp; the 8-bit kernel and other backends keep heads).
        On 2x H200 keys was 1.0-1.1% faster per step than heads, but its merged softmax rounds
        differently from one process (rel. L2 0.018 / 0.067 after a 1 / 3-pass window, against
        0.0 for heads), so heads stays the default."""
        return self.exchange == "keys" and sdpa

    def pieces_for(self, num_heads: int) -> int:
        """The piece count used for a model of `num_heads` heads (divides heads / world)."""
        local = num_heads // self.world
        return max(p for p in range(1, min(self.pieces, local) + 1) if local % p == 0)

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

    def heads(self, shape: tuple[int, int, int, int]) -> HeadExchange:
        """The Ulysses exchange of one self-attention (ulysses.HeadExchange) for q, k, v of
        `shape` [B, chunk, H, D]: put them as they are computed, then attend."""
        return HeadExchange(self, shape)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attend,
                  first_frame_keys: bool = False):
        """Ulysses attention over the whole sequence from this rank's tokens.

        q, k, v [B, chunk, H, D] (local tokens, all heads); attend(q, k, v) runs attention on
        [B, P, h, D] views. Returns out [B, chunk, H, D] and, with `first_frame_keys`, the keys of
        the first latent frame with all heads [B, frame_tokens, H, D] (InfiniteTalk's speaker
        map reads only those), else None."""
        exchange = self.heads(tuple(q.shape))
        for t in (q, k, v):
            exchange.put(t)
        return exchange.attend(attend, first_frame_keys)

    def attention_by_keys(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          first_frame_keys: bool = False):
        """Attention of this rank's queries over every rank's keys, all heads, from the same
        inputs and with the same outputs as `attention` (SDPA only). Every rank sends its keys
        and values to every other, starts on its own keys while they travel, then folds in
        each other rank's keys through the log-sum-exp (attention.merge_partial): nothing comes
        back, no head reshuffle, and the transfer hides behind the first attention."""
        from .attention import attention_lse, merge_partial

        w, me, length = self.sp.world, self.sp.rank, self.length
        k, v = k.contiguous(), v.contiguous()
        got = {j: (torch.empty_like(k), torch.empty_like(v)) for j in range(w) if j != me}
        ops = []
        for j, (kj, vj) in got.items():
            peer = self._global(j)
            ops += [dist.P2POp(dist.isend, k, peer, self.sp.group),
                    dist.P2POp(dist.isend, v, peer, self.sp.group),
                    dist.P2POp(dist.irecv, kj, peer, self.sp.group),
                    dist.P2POp(dist.irecv, vj, peer, self.sp.group)]
        works = dist.batch_isend_irecv(ops) if ops else []
        chunks = {**got, me: (k, v)}
        real = {j: max(0, min(self.chunk, length - j * self.chunk)) for j in range(w)}
        out = lse = None
        for step, j in enumerate([me] + [j for j in range(w) if j != me]):
            if step == 1:   # every other rank's keys are needed from here on
                for work in works:
                    work.wait()
            if real[j] == 0:
                continue
            kj, vj = chunks[j]
            part, part_lse = attention_lse(q, kj[:, :real[j]], vj[:, :real[j]])
            out, lse = (part, part_lse) if out is None else merge_partial(out, lse, part, part_lse)
        first = None
        if first_frame_keys:
            need = math.ceil(self.frame_tokens / self.chunk)   # chunks holding the first frame
            first = torch.cat([chunks[j][0] for j in range(need)], dim=1)[:, :self.frame_tokens]
        return out, first

    def _global(self, j: int) -> int:
        """The default group's rank of this group's rank j (what point-to-point ops address)."""
        return j if self.sp.group is None else dist.get_global_rank(self.sp.group, j)

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
# True inside same_on_every_rank.
_REPLICATED: contextvars.ContextVar = contextvars.ContextVar("wanvideo_replicated", default=False)


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


@contextlib.contextmanager
def same_on_every_rank():
    """For layers whose input every rank holds in full (the text, CLIP and audio tokens that
    cross-attention projects to keys and values): its scale is already the whole tensor's, so
    agree_scale skips the all_reduce. Each all_reduce is a point where both ranks wait for
    each other; on 2x H200 the 13 per 14B block cost ~3 ms (bench/sp_profile.py --diagnose),
    5 of them were these."""
    token = _REPLICATED.set(True)
    try:
        yield
    finally:
        _REPLICATED.reset(token)


def agree_scale(scale: torch.Tensor) -> torch.Tensor:
    """`scale` (0-d, per tensor, larger = coarser) as the maximum over the ranks that share the
    running forward; unchanged outside a sharded forward or inside same_on_every_rank. Every
    rank quantizes the same layers in the same order, so these all_reduces pair up."""
    shard = _RUNNING.get()
    if shard is None or _REPLICATED.get():
        return scale
    agreed = scale.reshape(1).clone()   # never write into a layer's stored input scale
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX, group=shard.sp.group)
    return agreed.reshape(())


def split_rotations(shard: TokenShard, rot: torch.Tensor) -> torch.Tensor:
    """This rank's rows of the RoPE rotations [L, 1, D/2] (complex): every token keeps its global
    position; padding tokens get the identity rotation."""
    return shard.local(rot, 0, fill=1.0)
