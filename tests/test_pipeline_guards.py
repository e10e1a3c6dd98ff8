"""generate_video refuses what cannot give a correct video, before work or at the window where
it happens: T2V models, NaN/Inf inputs, NaN latents or frames, videos that cannot fit in memory.
It also logs BlockSwap figures per window rather than running totals."""
from __future__ import annotations

import logging

import pytest
import torch

from test_pipeline import SHORT, StandInVAE, make_request, tiny_model
from wanvideo_infinitetalk.multitalk.pipeline import (NonFiniteError, VideoRequest, generate_video,
                                                      preflight)
from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model, storage_dtype_policy
from wanvideo_infinitetalk.wanvideo.memory import HOST_LIMIT_ENV, MemoryBudgetError
from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_T2V, random_state_dict


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_t2v_model_with_the_patch_is_refused_naming_the_type():
    vae = StandInVAE()
    with pytest.raises(ValueError, match=r"T2V .*image-to-video"):
        generate_video(tiny_model(TINY_T2V, seed=2), make_request(vae, **SHORT), vae.encode, vae.decode)


def test_model_without_audio_layers_is_refused(model):
    bare = build_meta_model(model.config)
    placement.materialize(bare, random_state_dict(model.config, seed=1), torch.device("cpu"),
                          dtype_for=storage_dtype_policy(torch.float32))
    with pytest.raises(ValueError, match="no InfiniteTalk layers"):
        preflight(bare, make_request(StandInVAE(), **SHORT))


@pytest.mark.parametrize("field, words", [
    ("features", "speaker 1's audio features"), ("clip_fea", "CLIP vision tokens"),
    ("positive", "positive prompt"), ("negative", "negative prompt"), ("y", "image condition"),
    ("reference", "portrait"),
])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_inputs_are_refused_before_any_model_call(model, field, words, value):
    vae = StandInVAE()
    r = make_request(vae, **SHORT)
    t = (r.features[0] if field == "features" else getattr(r, field)).clone()
    t.view(-1)[t.numel() // 3] = value
    setattr(r, field, [t] if field == "features" else t)
    calls = []
    with pytest.raises(NonFiniteError, match=words):
        generate_video(lambda *a, **k: calls.append(1), r, vae.encode, vae.decode)
    assert calls == []


class _NaNAfter:
    """Delegates to the model, but its output turns NaN from model call `n` on."""

    def __init__(self, model, n):
        self.model, self.n, self.calls = model, n, 0
        self.config, self.audio_proj = model.config, model.audio_proj

    def __call__(self, x, *a, **k):
        self.calls += 1
        out = self.model(x, *a, **k)
        return out * float("nan") if self.calls >= self.n else out


def test_nan_latents_stop_at_their_window_with_its_number(model):
    vae = StandInVAE()
    r = make_request(vae, **SHORT)                 # 3 windows x 1 step x 3 passes
    with pytest.raises(NonFiniteError, match=r"window 2/3: the sampled latents"):
        generate_video(_NaNAfter(model, 4), r, vae.encode, vae.decode)


def test_nan_frames_from_the_vae_are_refused(model):
    vae = StandInVAE()
    r = make_request(vae, **SHORT)

    def bad_decode(z):
        return vae.decode(z) * float("nan")

    with pytest.raises(NonFiniteError, match=r"window 1/3: the decoded frames"):
        generate_video(model, r, vae.encode, bad_decode)


def test_a_video_larger_than_host_ram_is_refused_with_the_numbers(model, monkeypatch):
    vae = StandInVAE()
    monkeypatch.setenv(HOST_LIMIT_ENV, str(10 * 2 ** 20))      # a 10 MiB machine
    r = make_request(vae, seconds=60.0, clip=17, motion=5, steps=1)
    with pytest.raises(MemoryBudgetError, match=r"video \(1500 frames at 64x64\) .*needs about "
                                                r"[\d.]+ GB, 0\.0 GB available"):
        preflight(model, r)


def test_blockswap_figures_are_per_window(model, caplog):
    from wanvideo_infinitetalk.wanvideo.block_swap import BlockSwap

    swap = BlockSwap(blocks_to_swap=1, device="cpu").attach(model)
    try:
        vae = StandInVAE()
        for _ in range(2):                          # a second video: no totals carried over
            with caplog.at_level(logging.INFO):
                caplog.clear()
                generate_video(model, make_request(vae, **SHORT), vae.encode, vae.decode)
            lines = [r.getMessage() for r in caplog.records if "InfiniteTalk window" in r.getMessage()]
            assert len(lines) == 3 and all("3 forwards" in line for line in lines), lines
    finally:
        swap.detach(model)
