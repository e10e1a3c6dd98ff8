"""Worker processes for tests/test_sequence_parallel.py (a helper, not a test module), and
`spawn`, which starts such workers for it and tests/test_peer_copy.py.

Every rank builds the same tiny I2V + InfiniteTalk model (4 heads) from one seed, computes the
single-process reference itself, then the same forward or sampling step split over a gloo group,
and writes the relative errors it measured to OUT/rank<N>.json for the parent to check."""
from __future__ import annotations

import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402,F401  (imports the pack as wanvideo_infinitetalk)
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from test_pipeline import tiny_model  # noqa: E402
from wanvideo_infinitetalk.multitalk.audio_proj import AudioInput  # noqa: E402
from wanvideo_infinitetalk.wanvideo.config import WanConfig  # noqa: E402
from wanvideo_infinitetalk.wanvideo.guidance import Guidance  # noqa: E402
from wanvideo_infinitetalk.wanvideo.guidance_parallel import (  # noqa: E402
    GuidanceParallel, parallel_layout)
from wanvideo_infinitetalk.wanvideo.sampling import sample_window  # noqa: E402
from wanvideo_infinitetalk.wanvideo.schedules import flow_sigmas  # noqa: E402
from wanvideo_infinitetalk.wanvideo.sequence_parallel import (  # noqa: E402
    SequenceParallel, agree_scale, same_on_every_rank, sharded_forward)

# 4 heads of 64, so degrees 2 and 4 both divide the heads, as 2/4/5/8 divide the real model's 40.
TINY_I2V_4_HEADS = WanConfig(dim=256, ffn_dim=512, num_heads=4, num_layers=2, in_dim=36,
                             out_dim=16, has_image_embedding=True)
# Latent sizes (frames, height, width): 48 tokens in frames of 16, and 45 tokens in frames of 15,
# which 2 and 4 ranks do not divide and whose chunks straddle frame boundaries.
EVEN, ODD = (3, 8, 8), (3, 6, 10)


def inputs(latent: tuple[int, int, int], speakers: int, seed: int = 11) -> dict:
    f, h, w = latent
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(speakers, 4 * (f - 1) + 1, 5, 12, 768, generator=g)
    masks = None
    if speakers == 2:  # speaker 1 on the left, speaker 2 on the right, in pixels of any size
        masks = torch.zeros(2, 8 * h, 8 * w)
        masks[0, :, : 4 * w], masks[1, :, 4 * w:] = 1, 1
    return dict(x=torch.randn(1, 16, f, h, w, generator=g),
                y=torch.randn(1, 20, f, h, w, generator=g),
                clip_fea=torch.randn(1, 257, 1280, generator=g),
                pos=torch.randn(1, 7, 4096, generator=g), neg=torch.randn(1, 5, 4096, generator=g),
                audio=AudioInput(feats, masks))


def forward(model, case: dict, t: float = 700.0, negative=False, audio=True) -> torch.Tensor:
    tt = torch.full((1,), float(t))
    a = case["audio"] if audio else case["audio"].silent()
    with torch.no_grad():
        return model(case["x"], tt, case["neg" if negative else "pos"], clip_fea=case["clip_fea"],
                     y=case["y"], audio=a).float()


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def forward_errors(model, sp: SequenceParallel, tag: str) -> dict:
    out = {}
    for name, latent, speakers in (("even_1spk", EVEN, 1), ("even_2spk", EVEN, 2),
                                   ("odd_1spk", ODD, 1), ("odd_2spk", ODD, 2)):
        case = inputs(latent, speakers)
        model.sequence_parallel = None
        want = forward(model, case)
        model.sequence_parallel = sp
        out[f"{tag}/{name}"] = rel_err(forward(model, case), want)
        model.sequence_parallel = None
    return out


def one_step(model, case, sp=None, runner=None) -> torch.Tensor:
    def model_fn(x, t, spec):
        return forward(model, dict(case, x=x), t, spec.negative_text, spec.audio)

    model.sequence_parallel = sp
    try:
        return sample_window(model_fn, case["x"][0:1], flow_sigmas(2, 7.0),
                             guidance=Guidance(5.0, 4.0), run_passes=runner)
    finally:
        model.sequence_parallel = None


def guidance_errors(model) -> dict:
    case = inputs(ODD, 2)
    want = one_step(model, case)
    out = {"guidance/4_ranks_3_passes": rel_err(one_step(model, case, runner=GuidanceParallel.from_group()), want)}
    sp, gp = parallel_layout(2)
    out["guidance+sequence/2x2"] = rel_err(one_step(model, case, sp=sp, runner=gp), want)
    return out


def scale_errors(rank: int, world: int) -> dict:
    """fp8 activation scales (quant_kernels) inside a sharded forward: the max over the ranks,
    the rank's own scale untouched; outside one, or for an input every rank holds in full
    (same_on_every_rank): unchanged, with no all_reduce."""
    shard = SequenceParallel.from_group().shard((1, 1, world))
    mine = torch.tensor(float(rank + 1))
    outside = agree_scale(mine)
    with sharded_forward(shard):
        with same_on_every_rank():
            replicated = agree_scale(mine)
        agreed = agree_scale(mine)
    return {"scale/agreed_max": abs(float(agreed) - world) + abs(float(mine) - (rank + 1)),
            "scale/outside_unchanged": abs(float(outside) - (rank + 1)),
            "scale/replicated_unchanged": abs(float(replicated) - (rank + 1))}


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)  # the same kernels and reduction order in every process
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        model = tiny_model(TINY_I2V_4_HEADS)
        # 4 ranks: the default exchanges heads (Ulysses); the key exchange works there too
        assert not SequenceParallel.from_group().by_keys(True)
        errors = forward_errors(model, SequenceParallel.from_group(), f"sp{world}")
        errors |= forward_errors(model, SequenceParallel.from_group(exchange="keys"),
                                 f"sp{world}keys")
        pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        pair = pairs[rank // 2]
        # 2 ranks: the default cuts each pair rank's 2 heads into 2 pieces (overlapped
        # all-to-alls); one piece is the plain exchange; keys exchanges keys and values (the
        # tiny model runs SDPA)
        heads = SequenceParallel.from_group(pair)
        assert heads.pieces_for(4) == 2 and not heads.by_keys(True)
        errors |= forward_errors(model, heads, "sp2")
        keys = SequenceParallel.from_group(pair, exchange="keys")
        assert keys.by_keys(True)
        errors |= forward_errors(model, keys, "sp2keys")
        errors |= forward_errors(model, SequenceParallel.from_group(pair, pieces=1,
                                                                    exchange="heads"), "sp2p1")
        errors |= guidance_errors(model)
        errors |= scale_errors(rank, world)
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(errors, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, world: int, out_dir: str, timeout_s: float) -> None:
    """fn(rank, world, port, out_dir) in `world` spawned processes; none is left behind."""
    ctx = mp.start_processes(fn, args=(world, free_port(), out_dir), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                raise TimeoutError(f"workers still running after {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
