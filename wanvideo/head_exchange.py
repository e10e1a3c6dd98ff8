"""The copies around the Ulysses all-to-alls (sequence_parallel.TokenShard.attention).

An all-to-all sends one contiguous chunk per rank, but a rank's heads are a column range of every
token's row. So q, k and v [B, n, H, D] (token-major) are packed into the send layout [pieces, 3,
world, B, n, hp, D] (head piece p, q/k/v, rank j, token: each of q, k, v is packed as soon as it
is computed, so it can travel while the next one is computed, and a received k or v is one [world
* n] token sequence), and the result comes back as [pieces, world, B, n, hp, D] to be put back in
token-major order [B, n, H, D]; rank j's piece p holds heads (j * pieces + p) * hp + [0, hp).

Why a kernel: torch's copies of these permuted views run its strided (unvectorised) copy kernel.
On 2x H200 at 32,760 tokens they took ~1 ms per 14B block and rank (8 launches of ~0.13 ms, about
1.3 TB/s) out of the ~4.3 ms a split block costs above half a block (bench/sp_profile.py). Every
(token, head group) row is hp * D contiguous elements on both sides, so one Triton launch moves
all of q, k and v with wide loads, and one more puts the result back.

`pack` / `unpack` take the Triton path for CUDA tensors whose token rows are dense (the layout
every caller passes) and fall back to the same copy in torch otherwise; both paths write the same
bytes (tests/test_head_exchange.py).
"""
from __future__ import annotations

import torch

from .fused_ops import enabled


def _kernel():
    from . import head_exchange_kernels   # imports triton: only when a CUDA tensor gets here
    return head_exchange_kernels.exchange


def _dense_rows(t: torch.Tensor) -> bool:
    """[B, n, H, D] whose (B, n) flatten to rows of H * D contiguous elements."""
    b, n, h, d = t.shape
    return (t.stride(3) == 1 and t.stride(2) == d and
            (b == 1 or t.stride(0) == n * t.stride(1)))


def _launch(tokens: list[torch.Tensor], exchange: torch.Tensor, world: int, pieces: int,
            to_exchange: bool, own: torch.Tensor | None = None, me: int = -1,
            slots: int = 1, slot: int = 0) -> None:
    b, n, h, d = tokens[0].shape
    chunk = h // (world * pieces) * d
    # The largest power of two dividing the chunk (no masked lanes: 1,280 -> 256, 2,560 -> 512),
    # one warp per 256 elements (16-byte accesses for 2-byte types).
    block = min(1024, chunk & -chunk)
    if block < 64:
        block = min(1024, max(16, 1 << (chunk - 1).bit_length()))
    ptrs = tokens + [tokens[0]] * (3 - len(tokens))
    _kernel()[(b * n, world * pieces)](
        *ptrs, exchange, exchange if own is None else own, -1 if own is None else me,
        b * n, tokens[0].stride(1), world, pieces, slots, slot, CHUNK=chunk,
        NT=len(tokens), TO_EXCHANGE=to_exchange, BLOCK=block, num_warps=max(1, block // 256))


def _use_kernel(tokens: list[torch.Tensor], exchange: torch.Tensor,
                own: torch.Tensor | None = None) -> bool:
    first = tokens[0]
    same_as_exchange = own is None or (own.is_contiguous() and own.shape == exchange.shape
                                       and own.dtype == exchange.dtype
                                       and own.device == exchange.device)
    return (enabled(exchange) and exchange.is_contiguous() and same_as_exchange
            and _dense_rows(first)
            and all(t.dtype == exchange.dtype and t.device == exchange.device
                    and t.shape == first.shape and t.stride() == first.stride() for t in tokens))


def pack(tensors: tuple[torch.Tensor, ...], send: torch.Tensor, own: torch.Tensor | None = None,
         me: int = -1, slot: int = 0) -> torch.Tensor:
    """Write tensors [B, n, H, D] (q, k, v or some of them) into slots slot, slot + 1, ... of
    `send` [pieces, slots, world, B, n, hp, D]; with `own` (same shape), rank `me`'s parts
    [:, :, me] go there instead (the receive buffer: a rank's own heads never travel, so they are
    written once, where attention reads them)."""
    pieces, slots, world = send.shape[:3]
    if slot + len(tensors) > slots:
        raise ValueError(f"{len(tensors)} tensors from slot {slot} do not fit {slots} slots")
    if _use_kernel(list(tensors), send, own):
        _launch(list(tensors), send, world, pieces, to_exchange=True, own=own, me=me,
                slots=slots, slot=slot)
        return send
    b, n, h, d = tensors[0].shape
    for i, t in enumerate(tensors):
        send[:, slot + i].copy_(t.reshape(b, n, world, pieces, h // (world * pieces), d)
                                .permute(3, 2, 0, 1, 4, 5))
    if own is not None:
        own[:, slot:slot + len(tensors), me].copy_(send[:, slot:slot + len(tensors), me])
    return send


def unpack(got: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write `got` [pieces, world, B, n, hp, D] into out [B, n, H, D] (token-major)."""
    pieces, world = got.shape[:2]
    if _use_kernel([out], got):
        _launch([out], got, world, pieces, to_exchange=False)
        return out
    b, n, h, d = out.shape
    out.view(b, n, world, pieces, h // (world * pieces), d).copy_(got.permute(2, 3, 1, 0, 4, 5))
    return out
