"""Worker processes for tests/test_peer_copy.py (a helper, not a test module).

Two NCCL ranks run TokenShard.attention (Ulysses) on the same random q/k/v with each transport
and piece count, several calls in a row (the copy-engine workspace is reused, then grown for a
longer sequence), and rank 0 writes to OUT/result.json how far each differs from unsplit
attention and from the send/recv transport."""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402,F401  (imports the pack as wanvideo_infinitetalk)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from wanvideo_infinitetalk.wanvideo.attention import attention  # noqa: E402
from wanvideo_infinitetalk.wanvideo.sequence_parallel import SequenceParallel  # noqa: E402

HEADS, DIM = 8, 64
# (frames, height, width) token grids: 3 * 7 * 9 = 189 tokens (odd: the last chunk is padded),
# then a longer one that makes the copy-engine workspace grow.
GRIDS = ((3, 7, 9), (5, 8, 11))


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    device = torch.device(f"cuda:{rank}")
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=device)
    try:
        result = {}
        for grid in GRIDS:
            length = grid[0] * grid[1] * grid[2]
            for call in range(3):
                g = torch.Generator().manual_seed(100 * call + length)
                q, k, v = (torch.randn(1, length, HEADS, DIM, generator=g)
                           .to(device, torch.bfloat16) for _ in range(3))
                want = attention(q, k, v, "sdpa").float()
                outs = {}
                for transport in ("send_recv", "copy_engine"):
                    for pieces in (1, 2):
                        sp = SequenceParallel.from_group(pieces=pieces, transport=transport)
                        shard = sp.shard(grid)
                        local = [shard.local(t, 1) for t in (q, k, v)]
                        out, first = shard.attention(
                            *local, lambda a, b, c: attention(a, b, c, "sdpa"), True)
                        full = shard.gather_tokens(out.flatten(2)).view_as(q).float()
                        outs[(transport, pieces)] = full
                        frame = grid[1] * grid[2]
                        key = f"{grid}/{call}/{transport}/{pieces}"
                        result[key] = {
                            "vs_unsplit": float((full - want).norm() / want.norm()),
                            "first_keys_equal": bool(torch.equal(first, k[:, :frame]))}
                for pieces in (1, 2):
                    a, b = outs[("send_recv", pieces)], outs[("copy_engine", pieces)]
                    result[f"{grid}/{call}/equal/{pieces}"] = bool(torch.equal(a, b))
        if rank == 0:
            with open(os.path.join(out_dir, "result.json"), "w") as f:
                json.dump(result, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def peer_verdict(rank: int, world: int, port: int, out_dir: str) -> None:
    """Ranks on "GPUs" 0..world-1 (gloo, CPU) where only GPU 0 lacks peer access to GPU 1: every
    rank must reach the same verdict (send/recv), each naming why."""
    from unittest import mock

    from wanvideo_infinitetalk.wanvideo import peer_copy

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        def access(a, b):
            return (a, b) != (0, 1)

        with mock.patch.object(torch.cuda, "can_device_access_peer", access):
            why = peer_copy._peer_access(None, torch.device("cuda", rank), on=torch.device("cpu"))
        with open(os.path.join(out_dir, f"verdict{rank}.json"), "w") as f:
            json.dump({"why": why}, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
