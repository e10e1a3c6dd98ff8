"""Our transformer against diffusers' independent implementation, weights converted by key map."""
import pytest
import torch

from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model, storage_dtype_policy
from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, TINY_T2V, random_state_dict
from wan_reference import diffusers_forward, diffusers_model


def ours(cfg, sd, dtype, device="cpu"):
    model = build_meta_model(cfg)
    placement.materialize(model, sd, torch.device(device), dtype_for=storage_dtype_policy(dtype))
    model.compute_dtype = dtype
    return model.eval()


def inputs(cfg, device="cpu", frames=5, size=(8, 12)):
    g = torch.Generator().manual_seed(1)
    lat = (frames - 1) // 4 + 1
    x = torch.randn(1, 16, lat, *size, generator=g)
    t = torch.tensor([637.0])
    ctx = torch.randn(1, 11, cfg.text_dim, generator=g)
    clip = torch.randn(1, 257, cfg.clip_dim, generator=g) if cfg.has_image_embedding else None
    y = torch.randn(1, cfg.in_dim - 16, lat, *size, generator=g) if cfg.has_image_embedding else None
    move = (lambda v: None if v is None else v.to(device))
    return tuple(move(v) for v in (x, t, ctx, clip, y))


@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_fp32_parity_with_diffusers(cfg):
    sd = random_state_dict(cfg, seed=3)
    x, t, ctx, clip, y = inputs(cfg)
    with torch.no_grad():
        out = ours(cfg, sd, torch.float32)(x, t, ctx, clip, y)
    ref = diffusers_forward(diffusers_model(cfg, sd), x, t, ctx, clip, y)
    assert out.shape == ref.shape == x.shape
    err = (out - ref).abs().max().item()
    print(f"fp32 parity {cfg.model_type}: max|ours-ref| / max|ref| = {err / ref.abs().max().item():.2e}")
    assert err <= 1e-4 * ref.abs().max().item(), err


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", [TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def test_bf16_parity_with_diffusers_cuda(cfg):
    sd = random_state_dict(cfg, seed=3)
    x, t, ctx, clip, y = inputs(cfg, "cuda", frames=9, size=(16, 24))
    with torch.no_grad():
        out = ours(cfg, sd, torch.bfloat16, "cuda")(x, t, ctx, clip, y)
        ref = diffusers_forward(diffusers_model(cfg, sd, torch.bfloat16, "cuda"), x.bfloat16(), t,
                                ctx.bfloat16(), None if clip is None else clip.bfloat16(),
                                None if y is None else y.bfloat16())
    err = (out.float() - ref.float()).abs().max().item()
    print(f"bf16 CUDA parity {cfg.model_type}: max|ours-ref| / max|ref| = "
          f"{err / ref.float().abs().max().item():.2e}")
    assert err <= 2e-2 * ref.float().abs().max().item(), err
