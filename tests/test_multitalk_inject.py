"""InfiniteTalk injection: key set, dtypes, layout invariant, errors, and a tiny forward."""
import json
import os
import subprocess
import sys

import pytest
import torch

from wanvideo_infinitetalk.multitalk import inject, tiny
from wanvideo_infinitetalk.multitalk.audio_proj import AudioInput
from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.checkpoint import CheckpointError, open_checkpoint
from wanvideo_infinitetalk.wanvideo.config import WAN21_14B_I2V
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model
from wanvideo_infinitetalk.wanvideo.loader import load_model as load_base_model
from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict, write_checkpoint


def load_model(*args, **kwargs):
    """The loader as the nodes call it: with multitalk's InfiniteTalk injector."""
    return load_base_model(*args, inject=inject.apply_infinitetalk_from_checkpoints, **kwargs)


KEYS_JSON = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                         "wan21_i2v_14b_infinitetalk_keys.json")


def test_14b_meta_injection_has_exactly_the_reference_keys():
    if not os.path.isfile(KEYS_JSON):
        pytest.skip("reference key list not available")
    with open(KEYS_JSON) as f:
        ref = {k: tuple(v) for k, v in json.load(f)["keys"].items()}
    model = build_meta_model(WAN21_14B_I2V)
    base = set(model.state_dict())
    audio_ref = {k: v for k, v in ref.items() if k not in base}
    assert len(audio_ref) == 330
    patch = {k: torch.empty(v, device="meta", dtype=torch.bfloat16) for k, v in audio_ref.items()}
    info = inject.inject_infinitetalk(model, patch, "meta", where="14b-meta", dtype=torch.bfloat16)
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(got) == 1633
    assert got == ref
    assert info["keys_found"] == 330 and info["blocks_patched"] == 40
    audio_params = sum(v.numel() for k, v in model.state_dict().items() if inject.is_audio_key(k))
    assert abs(audio_params / 1e9 - 2.49) < 0.01


def test_detect_by_key_with_prefixes_and_speaker_hint():
    keys = list(tiny.infinitetalk_shapes(32, 2))
    assert inject.detect_infinitetalk(["blocks.0.self_attn.q.weight"]) is None
    for prefix in ("", "model.diffusion_model.", "diffusion_model."):
        info = inject.detect_infinitetalk([prefix + k for k in keys], {"speakers": "2"})
        assert info["prefix"] == prefix and info["keys_found"] == len(keys) == 2 * 8 + 10
        assert info["blocks"] == 2 and info["speakers"] == "multi"
    assert inject.detect_infinitetalk(keys, {"title": "InfiniteTalk single"})["speakers"] == "single"
    assert inject.detect_infinitetalk(keys)["speakers"] is None


@pytest.fixture(scope="module")
def base_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("wan") / "tiny_i2v.safetensors")
    write_checkpoint(random_state_dict(TINY_I2V, seed=0), path)
    return path


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float8_e4m3fn])
def test_patch_injection_keeps_layout_and_values(tmp_path, base_file, dtype):
    patch = tiny.write_infinitetalk_patch(str(tmp_path / "it.safetensors"), TINY_I2V.dim,
                                          TINY_I2V.num_layers, dtype=dtype, data_start_mod16=8)
    ckpt = open_checkpoint(patch)
    assert all(info.start % 16 == 8 for info in ckpt.tensors.values())  # misaligned on purpose
    loaded = load_model(base_file, base_dtype="bf16", patch=patch)
    model, report = loaded.model, loaded.report
    assert report["infinitetalk"]["blocks_patched"] == TINY_I2V.num_layers
    assert report["infinitetalk"]["speakers"] == "single"
    assert placement.check_layout(model) == []
    want = tiny.infinitetalk_state_dict(TINY_I2V.dim, TINY_I2V.num_layers)
    sd = model.state_dict()
    for k, v in want.items():
        assert sd[k].dtype == torch.bfloat16, k
        torch.testing.assert_close(sd[k].float(), v.to(dtype).float(), msg=k)
    for p in model.parameters():
        assert p.data_ptr() % 16 == 0


def test_merged_checkpoint_and_prefixed_patch(tmp_path):
    sd = random_state_dict(TINY_I2V, seed=0)
    sd.update(tiny.infinitetalk_state_dict(TINY_I2V.dim, TINY_I2V.num_layers))
    merged = str(tmp_path / "merged.safetensors")
    write_checkpoint(sd, merged, layout="comfy")
    loaded = load_model(merged, base_dtype="fp32")
    assert loaded.report["infinitetalk"]["keys_found"] == 26
    assert "unused_keys" not in loaded.report
    assert loaded.model.audio_proj is not None and placement.check_layout(loaded.model) == []


def test_dim_mismatch_names_both_dims(tmp_path, base_file):
    patch = tiny.write_infinitetalk_patch(str(tmp_path / "wrong.safetensors"), 128, TINY_I2V.num_layers)
    with pytest.raises(CheckpointError, match=r"wrong\.safetensors.*dim 128.*dim 256"):
        load_model(base_file, patch=patch)


def test_patch_without_audio_keys_says_so(tmp_path, base_file):
    bogus = str(tmp_path / "not_a_patch.safetensors")
    tiny.write_safetensors(bogus, {"blocks.0.self_attn.q.weight": torch.zeros(4, 4)})
    with pytest.raises(CheckpointError, match=r"not_a_patch\.safetensors: no InfiniteTalk audio keys"):
        load_model(base_file, patch=bogus)


def test_tiny_forward_one_and_two_speakers(tmp_path, base_file):
    patch = tiny.write_infinitetalk_patch(str(tmp_path / "it.safetensors"), TINY_I2V.dim,
                                          TINY_I2V.num_layers, speakers=2)
    model = load_model(base_file, base_dtype="fp32", patch=patch).model
    torch.manual_seed(0)
    f_lat, h, w = 2, 4, 4
    x = torch.randn(1, 16, f_lat, h, w)
    y = torch.randn(1, 20, f_lat, h, w)
    args = dict(t=torch.tensor([500.0]), context=torch.randn(1, 8, 4096),
                clip_fea=torch.randn(1, 257, 1280), y=y)
    feats = torch.randn(2, 5, 5, 12, 768)
    plain = model(x, **args)
    one = model(x, audio=AudioInput(feats[:1]), **args)
    masks = torch.zeros(2, 8, 8)
    masks[0, :, :4] = 1
    masks[1, :, 4:] = 1
    two = model(x, audio=AudioInput(feats, masks=masks), **args)
    silent = model(x, audio=AudioInput(feats[:1]).silent(), **args)
    for out in (one, two, silent):
        assert out.shape == plain.shape and torch.isfinite(out).all()
    assert not torch.allclose(one, plain) and not torch.allclose(two, one)
    assert not torch.allclose(silent, one)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_injection_from_misaligned_views_lands_aligned(dtype):
    """Source tensors that are zero-copy views at +8 bytes (like a mapped safetensors file)."""
    model = build_meta_model(TINY_I2V)
    placement.materialize(model, random_state_dict(TINY_I2V), "cpu",
                          dtype_for=lambda n, t: torch.bfloat16)
    want = tiny.infinitetalk_state_dict(TINY_I2V.dim, TINY_I2V.num_layers)
    views = {}
    for k, v in want.items():
        raw = v.to(dtype).contiguous().view(-1).view(torch.uint8)
        buf = torch.empty(raw.numel() + 24, dtype=torch.uint8)
        start = (8 - buf.data_ptr()) % 16
        buf[start:start + raw.numel()] = raw
        views[k] = buf[start:start + raw.numel()].view(dtype).view(v.shape)
        assert views[k].data_ptr() % 16 == 8
    inject.inject_infinitetalk(model, views, "cpu", where="views", dtype=torch.bfloat16)
    assert placement.check_layout(model) == []
    torch.testing.assert_close(model.blocks[1].audio_cross_attn.kv_linear.weight.float(),
                               want["blocks.1.audio_cross_attn.kv_linear.weight"].to(dtype).float())


def test_loader_without_injector_refuses_patch_and_reports_merged_keys(tmp_path, base_file):
    patch = tiny.write_infinitetalk_patch(str(tmp_path / "it.safetensors"), TINY_I2V.dim,
                                          TINY_I2V.num_layers)
    with pytest.raises(CheckpointError, match="injector"):
        load_base_model(base_file, patch=patch)
    sd = random_state_dict(TINY_I2V, seed=0)
    sd.update(tiny.infinitetalk_state_dict(TINY_I2V.dim, TINY_I2V.num_layers))
    merged = str(tmp_path / "merged.safetensors")
    write_checkpoint(sd, merged)
    report = load_base_model(merged, base_dtype="fp32").report
    assert report["infinitetalk"] is None and report["unused_keys"]["count"] == 26


def test_inspect_cli_injects_the_patch(tmp_path, base_file):
    patch = tiny.write_infinitetalk_patch(str(tmp_path / "it.safetensors"), TINY_I2V.dim,
                                          TINY_I2V.num_layers)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    res = subprocess.run([sys.executable, "-m", "wanvideo.inspect", base_file, "--patch", patch,
                          "--dtype", "fp32"], cwd=root, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["infinitetalk"]["blocks_patched"] == TINY_I2V.num_layers
