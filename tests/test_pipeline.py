"""multitalk.pipeline.generate_video on CPU with a tiny I2V + InfiniteTalk model and a stand-in VAE."""
from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from wanvideo_infinitetalk.multitalk import inject, tiny
from wanvideo_infinitetalk.multitalk.pipeline import VideoRequest, generate_video
from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model, storage_dtype_policy
from wanvideo_infinitetalk.wanvideo.sampling import SamplingCallbacks, SamplingInterrupted
from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict

SIZE = 64


def tiny_model(cfg=TINY_I2V, seed: int = 5):
    """A tiny Wan2.1 model (I2V unless `cfg` says otherwise) with InfiniteTalk layers, fp32."""
    model = build_meta_model(cfg)
    placement.materialize(model, random_state_dict(cfg, seed=seed), torch.device("cpu"),
                          dtype_for=storage_dtype_policy(torch.float32))
    model.compute_dtype = torch.float32
    inject.inject_infinitetalk(model, tiny.infinitetalk_state_dict(cfg.dim, cfg.num_layers),
                               "cpu", where="tiny patch", dtype=torch.float32)
    return model.eval()


class StandInVAE:
    """Wan's causal frame rule (frame 0 alone, then groups of 4) + 8x8 average pooling + a fixed
    random 3 -> 16 projection; decode is the (pseudo-)inverse, nearest upsampling."""

    def __init__(self, seed: int = 7):
        g = torch.Generator().manual_seed(seed)
        self.proj = torch.randn(16, 3, generator=g)
        self.back = torch.linalg.pinv(self.proj)
        self.encoded = []   # every encode output, in order

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        x = frames.float().permute(3, 0, 1, 2)                       # [3, F, H, W]
        first, rest = x[:, :1], x[:, 1:]
        if rest.shape[1]:
            rest = rest.reshape(3, rest.shape[1] // 4, 4, *x.shape[2:]).mean(2)
        x = torch.cat([first, rest], dim=1)
        x = F.avg_pool2d(x, 8)                                       # [3, F_lat, h, w]
        lat = torch.einsum("oc,cfhw->ofhw", self.proj, x).unsqueeze(0)
        self.encoded.append(lat.clone())
        return lat

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        x = torch.einsum("co,ofhw->cfhw", self.back, latents[0].float())
        x = torch.cat([x[:, :1], x[:, 1:].repeat_interleave(4, dim=1)], dim=1)
        x = x.repeat_interleave(8, dim=2).repeat_interleave(8, dim=3)
        return (x.permute(1, 2, 3, 0) * 0.5 + 0.5).clamp(0, 1)


def make_request(vae: StandInVAE, seconds: float = 3.0, clip: int = 81, motion: int = 9,
                 steps: int = 2, seed: int = 1, **kw) -> VideoRequest:
    g = torch.Generator().manual_seed(3)
    ref = torch.rand(SIZE, SIZE, 3, generator=g)
    pixels = torch.cat([ref[None], torch.zeros(clip - 1, SIZE, SIZE, 3)])
    lat = vae.encode(pixels)
    mask = torch.zeros(1, 4, lat.shape[2], *lat.shape[-2:])
    mask[:, :, 0] = 1
    frames = int(round(seconds * 25))
    return VideoRequest(
        reference=ref, y=torch.cat([mask, lat], dim=1),
        clip_fea=torch.randn(1, 257, 1280, generator=g),
        positive=torch.randn(1, 7, 4096, generator=g), negative=torch.randn(1, 5, 4096, generator=g),
        features=[torch.randn(frames, 12, 768, generator=g)], steps=steps, shift=7.0,
        text_scale=5.0, audio_scale=4.0, solver="euler", seed=seed, color_strength=0.5,
        clip_frames=clip, motion_frames=motion, **kw)


SHORT = dict(seconds=2.0, clip=17, motion=5, max_frames=30, steps=1)  # 3 windows of 5 latent frames


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def short(model):
    vae = StandInVAE()
    seen = []
    cb = SamplingCallbacks(progress=lambda i, n: seen.append((i, n)))
    out = generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode, cb)
    out.progress_seen = seen
    return out


def test_three_seconds_give_75_frames(model):
    vae = StandInVAE()
    out = generate_video(model, make_request(vae), vae.encode, vae.decode)
    assert out.num_frames == 75 and out.fps == 25 and out.seconds == 3.0
    assert out.frames.shape == (75, SIZE, SIZE, 3)
    assert out.frames.device.type == "cpu" and out.frames.dtype == torch.float32
    assert torch.isfinite(out.frames).all()
    assert out.plan.num_windows == 1


def test_max_frames_and_progress_over_all_windows(short):
    assert short.num_frames == 30 and short.frames.shape[0] == 30
    # windows of 17 with stride 12 cover 30 frames in 3 windows; 1 step each
    assert short.plan.num_windows == 3
    assert short.progress_seen == [(1, 3), (2, 3), (3, 3)]


def test_same_seed_same_frames_other_seed_differs(model, short):
    vae = StandInVAE()
    again = generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode)
    assert torch.equal(again.frames, short.frames)
    vae = StandInVAE()
    other = generate_video(model, make_request(vae, seed=2, **SHORT), vae.encode, vae.decode)
    assert not torch.equal(other.frames, short.frames)


def _block_swap():
    try:
        return importlib.import_module("wanvideo_infinitetalk.wanvideo.block_swap")
    except ImportError:
        pytest.skip("wanvideo.block_swap is not available")


def test_block_swap_gives_identical_frames(model, short):
    bs = _block_swap()
    swap = bs.BlockSwap(blocks_to_swap=1, device="cpu").attach(model)
    try:
        vae = StandInVAE()
        out = generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode)
        assert swap.stats()["forwards"] == 3 * 1 * 3
    finally:
        swap.detach(model)
    assert torch.equal(out.frames, short.frames)


class Spy:
    """Calls the model and records, per call, the first frames of the latents it saw."""

    def __init__(self, model):
        self.model, self.calls = model, []

    def __call__(self, x, t, context, **kw):
        self.calls.append((x.detach().clone(), float(t[0])))
        return self.model(x, t, context, **kw)


def test_motion_latents_are_clean_in_every_call_across_windows(model):
    vae = StandInVAE()
    req = make_request(vae, seconds=4.2, clip=17, motion=5, steps=2)
    spy = Spy(model)
    out = generate_video(spy, req, vae.encode, vae.decode)
    plan = out.plan
    assert out.num_frames == 105 and plan.num_windows >= 8
    passes, steps = 3, 2
    assert len(spy.calls) == plan.num_windows * steps * passes
    # vae.encoded[0] is y's latents; then one motion encode per window transition
    motions = [req.y[:, 4:, :1]] + vae.encoded[1:]
    assert len(motions) == plan.num_windows
    for k, win in enumerate(plan.windows):
        m = motions[k]
        assert m.shape[2] == win.motion_latent_frames == (1 if k == 0 else 2)
        for x, _t in spy.calls[k * steps * passes:(k + 1) * steps * passes]:
            assert torch.equal(x[:, :, :m.shape[2]], m.float())
            assert not torch.allclose(x[:, :, m.shape[2]:], torch.zeros(()))
    # later motion frames come from the previous window's decoded, colour-corrected frames
    assert not torch.equal(motions[1], motions[2])


def test_interrupt_raises_and_model_stays_usable(model, short):
    bs = _block_swap()
    swap = bs.BlockSwap(blocks_to_swap=1, device="cpu").attach(model)
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 4

    try:
        vae = StandInVAE()
        with pytest.raises(SamplingInterrupted):
            generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode,
                           SamplingCallbacks(should_stop=stop))
        assert all(swap.points_at_master(i) for i in swap.swapped_blocks)
        vae = StandInVAE()
        out = generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode)
    finally:
        swap.detach(model)
    assert torch.equal(out.frames, short.frames)
    assert placement.check_layout(model) == []


def test_bad_requests_are_explained(model):
    vae = StandInVAE()
    req = make_request(vae)
    req.clip_frames = 17
    with pytest.raises(ValueError, match="latent frames"):
        generate_video(model, req, vae.encode, vae.decode)
    req = make_request(vae)
    req.solver = "dpm"
    with pytest.raises(ValueError, match="solver"):
        generate_video(model, req, vae.encode, vae.decode)
    req = make_request(vae)
    req.features = [req.features[0], req.features[0][:10]]
    with pytest.raises(ValueError, match="length"):
        generate_video(model, req, vae.encode, vae.decode)


def test_fit_image_covers_and_centre_crops():
    from wanvideo_infinitetalk.multitalk.pipeline import fit_image

    img = torch.zeros(40, 100, 3)
    img[:, 40:60] = 1.0                           # a bright band in the middle
    out = fit_image(img, 32, 32)                  # scale 0.8 -> 32x80, crop 24 px each side
    assert out.shape == (32, 32, 3)
    assert out[:, 16].min() > 0.9 and out[:, 0].max() < 0.1
    assert fit_image(img[None], 96, 48).shape == (48, 96, 3)


def test_condition_frames_and_y():
    from wanvideo_infinitetalk.multitalk.pipeline import (condition_frames, condition_y,
                                                          validate_size)

    ref = torch.rand(16, 16, 3)
    frames = condition_frames(ref, 9)
    assert frames.shape == (9, 16, 16, 3) and torch.equal(frames[0], ref)
    assert (frames[1:] == 0.5).all()             # grey = the official zeros in [-1, 1]
    y = condition_y(torch.randn(1, 16, 3, 2, 2))
    assert y.shape == (1, 20, 3, 2, 2)
    assert (y[:, :4, 0] == 1).all() and (y[:, :4, 1:] == 0).all()
    for args, needle in (((70, 64, 81, 9), "multiple of 16"), ((64, 64, 80, 9), "4n\\+1"),
                         ((64, 64, 17, 17), "motion")):
        with pytest.raises(ValueError, match=needle):
            validate_size(*args)


def test_video_length_follows_audio_frames_not_feature_rows(model):
    """wav2vec yields int(s*25) rows, the video has round(s*25) frames: one row short is filled."""
    vae = StandInVAE()
    request = make_request(vae, seconds=1.0, clip=17, motion=5, steps=1)
    request.features = [request.features[0][:24]]   # int(0.98 * 25) rows for round(...) = 25 frames
    request.audio_frames = 25
    out = generate_video(model, request, vae.encode, vae.decode)
    assert out.num_frames == 25 and out.frames.shape[0] == 25
    request.features = [torch.randn(26, 12, 768)]    # one row too many is dropped
    assert generate_video(model, request, vae.encode, vae.decode).num_frames == 25
