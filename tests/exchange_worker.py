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


def fused_writes(rank: int, world: int, port: int, out_dir: str) -> None:
    """The tiny I2V + InfiniteTalk model split over the group with the fused kernels on: q and k
    written straight into the exchange buffers by the norm + RoPE kernel, against the same
    kernel's token-major output then packed (bit for bit), and against the unsplit forward.
    NCCL, CUDA and bf16 when there is a GPU; else gloo, fp32 and the kernels through Triton's
    interpreter (TRITON_INTERPRET=1 set by the caller). Rank 0 writes OUT/fused.json."""
    from unittest import mock

    import sp_worker
    from test_pipeline import tiny_model

    from wanvideo_infinitetalk.multitalk.audio_proj import AudioInput
    from wanvideo_infinitetalk.wanvideo import fused_ops, head_exchange

    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{rank}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, device_id=device)
    else:
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
    fused = fused_ops.rms_norm_rope
    writes = []

    def packed_after(x, weight, eps, cos, sin, heads, exchange=None):
        if exchange is None:
            return fused(x, weight, eps, cos, sin, heads)
        send, own, me, slot = exchange
        writes.append(slot)
        y = fused(x, weight, eps, cos, sin, heads).view(*x.shape[:2], heads, -1)
        return head_exchange.pack((y,), send, own=own, me=me, slot=slot)

    def always(x):
        return True

    patches = [] if cuda else [mock.patch.object(fused_ops, "enabled", always),
                               mock.patch.object(head_exchange, "enabled", always)]
    try:
        for p in patches:
            p.start()
        model = tiny_model(sp_worker.TINY_I2V_4_HEADS)
        if cuda:
            model = model.to(device, torch.bfloat16)
            model.compute_dtype = torch.bfloat16
        result = {}
        for speakers in (1, 2):
            case = sp_worker.inputs(sp_worker.ODD, speakers)
            audio = case["audio"]
            args = dict(x=case["x"], t=torch.full((1,), 700.0), context=case["pos"],
                        clip_fea=case["clip_fea"], y=case["y"])
            args = {k: v.to(device) for k, v in args.items()}
            args["audio"] = AudioInput(audio.features.to(device),
                                       None if audio.masks is None else audio.masks.to(device))
            with torch.no_grad():
                model.sequence_parallel = None
                want = model(**args).float()
                model.sequence_parallel = SequenceParallel.from_group(pieces=2)
                direct = model(**args).float()
                with mock.patch.object(fused_ops, "rms_norm_rope", packed_after):
                    packed = model(**args).float()
                model.sequence_parallel = None
            result[f"{speakers}spk"] = {
                "equal": bool(torch.equal(direct, packed)),
                "vs_unsplit": float((direct - want).norm() / want.norm()),
                "exchange_writes": len(writes)}
            writes.clear()
        if rank == 0:
            with open(os.path.join(out_dir, "fused.json"), "w") as f:
                json.dump(result, f)
        dist.barrier()
    finally:
        for p in patches:
            p.stop()
        dist.destroy_process_group()
