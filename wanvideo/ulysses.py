"""One self-attention's Ulysses exchange (sequence_parallel.TokenShard.heads), fed as q, k and v
are computed.

Why staged: the first piece's q/k/v and the last piece's output used to wait in the open (the
compute stream idled ~0.4 + ~0.2 ms per 14B block on 2x H200, bench/sp_profile.py --trace). Now
q leaves while k is computed, k while v is, and only the first piece of v travels in the open.
On the way back each piece's attention runs first for the queries of the other ranks' tokens,
whose outputs travel while it runs for this rank's own tokens, which need no transfer.

Buffers (peer_copy's links): send and receive [pieces, 3, world, B, n, hp, D] (piece, q/k/v,
rank, token), output receive [pieces, world, B, n, hp, D]. This rank's own heads are packed
straight into its receive buffer (head_exchange.pack, or for q and k the kernel that norms and
rotates them, fused_ops.rms_norm_rope), its own outputs copied into the output buffer; only the
peers' parts travel.
"""
from __future__ import annotations

import torch

from . import head_exchange, peer_copy


class HeadExchange:
    """put(q), put(k), put(v) (each [B, chunk, H, D], this rank's tokens, all heads), then
    attend(fn): the attention of all tokens for this rank's heads, back on this rank's tokens."""

    def __init__(self, shard, shape: tuple[int, int, int, int]):
        self.shard, self.shape = shard, tuple(shape)
        _, n, h, _ = self.shape
        if n != shard.chunk:
            raise ValueError(f"{n} tokens, expected this rank's chunk of {shard.chunk}")
        shard.sp.check_heads(h)
        self.pieces = shard.sp.pieces_for(h)
        self.hp = h // shard.sp.world // self.pieces
        self.pending: list[list] = [[] for _ in range(self.pieces)]
        self.given = 0

    def _buffers(self, like: torch.Tensor) -> None:
        """The link and its buffers, in q's dtype and device (known at the first put)."""
        w, (b, n, _, d) = self.shard.sp.world, self.shape
        self.link = peer_copy.link(self.shard, (self.pieces, 3, w, b, n, self.hp, d),
                                   (self.pieces, w, b, n, self.hp, d), like)
        self.send, self.recv, self.got = self.link.buffers()

    def put(self, t: torch.Tensor) -> None:
        """The next of q, k, v: packed, then on its way (v's arrival is what attend waits for)."""
        self.put_written(lambda send, own, me, slot: head_exchange.pack(
            (t,), send, own=own, me=me, slot=slot), t, tuple(t.shape))

    def put_written(self, write, like: torch.Tensor, shape=None) -> None:
        """The next of q, k, v, written by write(send, own, me, slot) as head_exchange.pack would
        write it (fused_ops.rms_norm_rope's `exchange`: no token-major copy to pack); `like`:
        a tensor of its dtype and device, `shape`: its shape (default: the exchange's)."""
        i, me = self.given, self.shard.sp.rank
        shape = self.shape if shape is None else tuple(shape)
        if i > 2 or shape != self.shape:
            raise ValueError(f"put #{i + 1} of shape {shape}: expected q, k, v of {self.shape}")
        if i == 0:
            self._buffers(like)
        elif like.dtype != self.send.dtype or like.device != self.send.device:
            raise ValueError(f"put #{i + 1} is {like.dtype} on {like.device}, q was "
                             f"{self.send.dtype} on {self.send.device}")
        write(self.send, self.recv, me, i)
        for p in range(self.pieces):
            self.pending[p].append(self.link.start(
                "in", self.recv, key=lambda x, p=p: (p, i, x),
                src=lambda j, p=p: self.send[p, i, j], barrier=i == 2, entry=i == 0 and p == 0))
        self.given += 1

    def attend(self, attend, first_frame_keys: bool = False):
        """attend(q, k, v) on [B, P, h, D] views, per piece and query chunk. Returns out
        [B, chunk, H, D] and, with `first_frame_keys`, the first latent frame's keys with all
        heads [B, frame_tokens, H, D] (InfiniteTalk's speaker map), else None."""
        if self.given != 3:
            raise RuntimeError(f"attend after {self.given} of q, k, v")
        shard, link, recv, got = self.shard, self.link, self.recv, self.got
        w, me, length = shard.sp.world, shard.sp.rank, shard.length
        b, n, h, d = self.shape
        back, keys = [], []
        for p in range(self.pieces):
            for pending in self.pending[p]:
                link.wait(pending)
            # received k, v of piece p: [w, B, n, hp, D] -> all tokens in order (views for B = 1)
            k, v = (recv[p, t].transpose(0, 1).reshape(b, w * n, self.hp, d)[:, :length]
                    for t in (1, 2))
            if first_frame_keys:
                keys.append(k[:, :shard.frame_tokens])
            # queries of rank j's tokens: their outputs go back to rank j
            outs = {j: attend(recv[p, 0, j], k, v) for j in range(w) if j != me}
            back.append((link.start("out", got, key=lambda x, p=p: (p, x),
                                    src=outs.__getitem__), outs))
            got[p, me].copy_(attend(recv[p, 0, me], k, v))
        for pending, _outs in back:
            link.wait(pending)
        result = head_exchange.unpack(got, got.new_empty(b, n, h, d))
        first = shard.gather_heads(torch.cat(keys, dim=2)) if first_frame_keys else None
        return result, first
