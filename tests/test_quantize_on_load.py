"""Quantizing while loading (wanvideo/quantize_on_load.py) gives bit for bit the model of the older
order (load everything, inject InfiniteTalk, merge LoRAs, quantize), LoRA problems still surface
as the same LoraError, and file problems in deferred weights as the same CheckpointError."""
import logging

import pytest
import torch
from safetensors.torch import save_file

from wanvideo_infinitetalk.multitalk import inject, tiny
from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.checkpoint import CheckpointError
from wanvideo_infinitetalk.wanvideo.loader import load_model
from wanvideo_infinitetalk.wanvideo.lora import LoraError
from wanvideo_infinitetalk.wanvideo.quant_linear import QuantLinear
from wanvideo_infinitetalk.wanvideo.tiny_models import (TINY_I2V, random_state_dict,
                                                        tiny_lora_state_dict, write_checkpoint)

FORMATS = ("fp8_e4m3fn", "fp8_e4m3fn_scaled", "nvfp4")
DIM, FFN = TINY_I2V.dim, TINY_I2V.ffn_dim


def _pair(out_f, in_f, seed, rank=4, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rank, in_f, generator=g) / in_f ** 0.5,
            torch.randn(out_f, rank, generator=g) * scale)


def _lora_a() -> dict:
    """Block linears (bf16 pairs + alpha), InfiniteTalk's audio layers, layers that stay in full
    precision (head, text embedding, a norm), a bias delta on a quantized layer, unknown keys."""
    sd = tiny_lora_state_dict(TINY_I2V, seed=3)
    for i, (name, shape) in enumerate((("blocks.0.audio_cross_attn.q_linear", (DIM, DIM)),
                                       ("blocks.1.audio_cross_attn.kv_linear", (2 * DIM, 768)),
                                       ("head.head", (64, DIM)))):
        down, up = _pair(*shape, seed=10 + i)
        sd[f"diffusion_model.{name}.lora_down.weight"] = down.bfloat16()
        sd[f"diffusion_model.{name}.lora_up.weight"] = up.bfloat16()
    g = torch.Generator().manual_seed(20)
    sd["diffusion_model.text_embedding.0.diff"] = torch.randn(DIM, 4096, generator=g) * 1e-3
    sd["diffusion_model.blocks.1.norm3.diff"] = torch.randn(DIM, generator=g) * 1e-2
    sd["diffusion_model.blocks.0.ffn.0.diff_b"] = torch.randn(FFN, generator=g) * 1e-2
    sd["diffusion_model.blocks.0.self_attn.nonexistent.lora_A.weight"] = torch.zeros(4, DIM)
    sd["text_encoder.foo.lora_A.weight"] = torch.zeros(4, 8)
    return sd


def _lora_b() -> dict:
    """fp32, diffusers names, overlapping lora A's layers (the order of the two merges counts)."""
    down, up = _pair(DIM, DIM, seed=30)
    g = torch.Generator().manual_seed(31)
    return {"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
            "transformer.blocks.0.attn1.to_q.lora_B.weight": up,
            "transformer.blocks.0.attn1.to_q.alpha": torch.tensor(2.0),
            "blocks.1.ffn.2.diff": torch.randn(DIM, FFN, generator=g) * 1e-3,
            "blocks.1.audio_cross_attn.proj.diff_b": torch.randn(DIM, generator=g) * 1e-2}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    base = str(d / "tiny_i2v.safetensors")
    write_checkpoint(random_state_dict(TINY_I2V, seed=0), base)
    patch = tiny.write_infinitetalk_patch(str(d / "it.safetensors"), DIM, TINY_I2V.num_layers,
                                          channels=tiny.TINY_WAV2VEC_HIDDEN)
    lora_a, lora_b = str(d / "lora_a.safetensors"), str(d / "lora_b.safetensors")
    save_file(_lora_a(), lora_a)
    save_file(_lora_b(), lora_b)
    return {"base": base, "patch": patch, "loras": [(lora_a, 0.8), (lora_b, -0.5)], "dir": d}


def load(files, streamed, **kw):
    kw.setdefault("patch", files["patch"])
    return load_model(files["base"], base_dtype="bf16", inject=inject.apply_infinitetalk_from_checkpoints,
                      _streamed=streamed, **kw)


def tensors(model) -> dict:
    """Every parameter and buffer, non-persistent ones too (quantized layers' swizzled scales)."""
    out = dict(model.named_parameters())
    out.update(model.named_buffers())
    return out


def assert_same_model(a, b):
    ta, tb = tensors(a), tensors(b)
    assert list(ta) == list(tb)
    for name, x in ta.items():
        y = tb[name]
        assert (x.dtype, x.shape, x.device) == (y.dtype, y.shape, y.device), name
        assert torch.equal(x.contiguous().view(-1).view(torch.uint8),
                           y.contiguous().view(-1).view(torch.uint8)), name
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    assert list(ma) == list(mb)
    for name, m in ma.items():
        assert type(m) is type(mb[name]), name
        if isinstance(m, QuantLinear):
            keys = ("fmt", "path", "compute_dtype", "input_scaling", "quantizer", "fast_accum",
                    "in_features", "out_features")
            assert {k: getattr(m, k) for k in keys} == {k: getattr(mb[name], k) for k in keys}, name


@pytest.mark.parametrize("with_loras", [False, True], ids=["no_lora", "two_loras"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_streamed_load_is_bit_identical_to_load_then_quantize(files, fmt, with_loras, caplog):
    loras = files["loras"] if with_loras else ()
    old = load(files, False, quantization=fmt, loras=loras)
    with caplog.at_level(logging.INFO, logger="wanvideo_infinitetalk.wanvideo.quantize_on_load"):
        new = load(files, True, quantization=fmt, loras=loras)
    assert_same_model(old.model, new.model)
    assert new.report == old.report
    quantized = [n for n, m in new.model.named_modules() if isinstance(m, QuantLinear)]
    # 12 linears per I2V block + InfiniteTalk's 3: the injected layers are quantized too.
    assert len(quantized) == 15 * TINY_I2V.num_layers
    assert "blocks.1.audio_cross_attn.kv_linear" in quantized
    assert f"quantized while loading: {len(quantized)} layers to {fmt}" in caplog.text
    assert placement.check_layout(new.model) == []
    assert not any(t.device.type == "meta" for t in tensors(new.model).values())
    if with_loras:
        merged = new.report["loras"][0]["merged"]
        assert {"head.head", "text_embedding.0", "blocks.1.norm3",
                "blocks.0.audio_cross_attn.q_linear"} <= set(merged)
        assert new.report["loras"][0]["unknown"] == [
            "diffusion_model.blocks.0.self_attn.nonexistent.lora_A.weight",
            "text_encoder.foo.lora_A.weight"]


@pytest.mark.gpu
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn_scaled", "nvfp4"])
def test_streamed_load_on_cuda_is_bit_identical(files, fmt, device):
    """The math on the GPU, weights stored on the host (offload) or on the GPU."""
    kw = dict(quantization=fmt, loras=files["loras"], device=device, compute_device="cuda")
    old, new = load(files, False, **kw), load(files, True, **kw)
    assert_same_model(old.model, new.model)
    assert new.report == old.report
    if fmt != "nvfp4" and torch.cuda.get_device_capability() >= (8, 9):
        assert set(new.report["quantization"]["paths"]) == {"scaled_mm"}


def test_merged_infinitetalk_checkpoint_and_fp8_matmul(files):
    """InfiniteTalk keys inside the base file, another fp8_matmul: still the same model."""
    sd = random_state_dict(TINY_I2V, seed=0)
    sd.update(tiny.infinitetalk_state_dict(DIM, TINY_I2V.num_layers, channels=tiny.TINY_WAV2VEC_HIDDEN))
    merged = str(files["dir"] / "merged.safetensors")
    write_checkpoint(sd, merged, layout="comfy")
    kw = dict(patch=None, quantization="fp8_e4m3fn_scaled", fp8_matmul="accurate", loras=files["loras"])
    old = load_model(merged, inject=inject.apply_infinitetalk_from_checkpoints, _streamed=False, **kw)
    new = load_model(merged, inject=inject.apply_infinitetalk_from_checkpoints, **kw)
    assert_same_model(old.model, new.model)
    assert new.report == old.report and new.report["infinitetalk"]["blocks_patched"] == 2


def both_raise(files, error, **kw) -> str:
    messages = []
    for streamed in (False, True):
        with pytest.raises(error) as info:
            load(files, streamed, **kw)
        messages.append(str(info.value))
    assert messages[0] == messages[1]
    return messages[1]


def test_lora_errors_name_the_file_as_before(files):
    d = files["dir"]
    down, up = _pair(DIM, DIM, seed=40)
    q = "blocks.0.self_attn.q"
    up_nan = up.clone()
    up_nan[3, 1] = float("nan")
    save_file({f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up_nan}, str(d / "nan.safetensors"))
    message = both_raise(files, LoraError, quantization="fp8_e4m3fn_scaled",
                         loras=[(str(d / "nan.safetensors"), 1.0)])
    assert message.startswith("nan.safetensors:") and "holds NaN/Inf values (1 of" in message
    save_file({f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up}, str(d / "big.safetensors"))
    message = both_raise(files, LoraError, quantization="nvfp4",
                         loras=[(files["loras"][0][0], 1.0), (str(d / "big.safetensors"), 1e39)])
    assert message.startswith(f"big.safetensors: merging into '{q}' at strength 1e+39 gives NaN/Inf")
    save_file({"lora_unet_down_blocks_0_attn_to_q.lora_down.weight": down},
              str(d / "sdxl.safetensors"))
    message = both_raise(files, LoraError, quantization="fp8_e4m3fn",
                         loras=[(str(d / "sdxl.safetensors"), 1.0)])
    assert message.startswith("sdxl.safetensors: LoRA for another model")
    save_file({f"{q}.lora_down.weight": down, f"{q}.lora_up.weight": up[:, :3].contiguous()},
              str(d / "shape.safetensors"))
    message = both_raise(files, LoraError, quantization="fp8_e4m3fn",
                         loras=[(str(d / "shape.safetensors"), 1.0)])
    assert message.startswith(f"shape.safetensors: layer '{q}'")


def test_bad_deferred_weight_names_the_file_as_before(files):
    sd = random_state_dict(TINY_I2V, seed=0)
    sd["blocks.1.ffn.2.weight"] = torch.zeros(DIM, FFN // 2)
    path = files["dir"] / "wrong_shape.safetensors"
    write_checkpoint(sd, str(path))
    for streamed in (False, True):
        with pytest.raises(CheckpointError, match=r"wrong_shape\.safetensors: key "
                           r"'blocks\.1\.ffn\.2\.weight' has shape \(256, 256\), expected \(256, 512\)"):
            load_model(str(path), quantization="fp8_e4m3fn_scaled", _streamed=streamed)


def test_prequantized_file_is_not_quantized_again(tmp_path):
    path = str(tmp_path / "fp8.safetensors")
    write_checkpoint(random_state_dict(TINY_I2V, seed=0), path, dtype=torch.float8_e4m3fn)
    for streamed in (False, True):
        with pytest.raises(ValueError, match="already quantized"):
            load_model(path, quantization="fp8_e4m3fn_scaled", _streamed=streamed)
