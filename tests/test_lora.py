"""LoRA merge: every key format, exact fp32 math, unknown keys reported, order vs quantization."""
import copy
import logging
import os

import pytest
import torch
from safetensors.torch import save_file

from wanvideo_infinitetalk import fp8_optimization as fo
from wanvideo_infinitetalk.wanvideo import lora, placement
from wanvideo_infinitetalk.wanvideo.quant_linear import QuantLinear

from quant_support import tiny_model

RANK = 4


def _ab(out_f, in_f, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(RANK, in_f, generator=g), torch.randn(out_f, RANK, generator=g)


def _expected(w, down, up, strength, alpha):
    scale = alpha / RANK if alpha is not None else 1.0
    return w.float() + (up.float().flatten(1) @ down.float().flatten(1)) * (strength * scale)


@pytest.mark.parametrize("style", ["lora_down", "lora_A", "lora_unet", "transformer", "comfy"])
def test_merge_exact_fp32(style):
    model = tiny_model(dtype=torch.float32)
    name = "blocks.0.self_attn.q"
    w0 = model.get_submodule(name).weight.detach().clone()
    down, up = _ab(64, 64, 0)
    alpha = 2.0
    if style == "lora_down":
        sd = {f"diffusion_model.{name}.lora_down.weight": down, f"diffusion_model.{name}.lora_up.weight": up,
              f"diffusion_model.{name}.alpha": torch.tensor(alpha)}
    elif style == "lora_A":
        sd = {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    elif style == "lora_unet":
        u = "lora_unet_" + name.replace(".", "_")
        sd = {f"{u}.lora_down.weight": down, f"{u}.lora_up.weight": up, f"{u}.alpha": torch.tensor(alpha)}
    elif style == "transformer":  # diffusers names: self_attn.q -> attn1.to_q
        sd = {"transformer.blocks.0.attn1.to_q.lora_A.weight": down,
              "transformer.blocks.0.attn1.to_q.lora_B.weight": up,
              "transformer.blocks.0.attn1.to_q.alpha": torch.tensor(alpha)}
    else:
        sd = {f"model.diffusion_model.{name}.lora_down.weight": down,
              f"model.diffusion_model.{name}.lora_up.weight": up, f"model.diffusion_model.{name}.alpha": torch.tensor(alpha)}
    res = lora.merge_loras(model, [(sd, 0.75)])
    assert res[0].merged == [name] and res[0].unknown == []
    assert torch.equal(model.get_submodule(name).weight, _expected(w0, down, up, 0.75, alpha))
    assert placement.check_layout(model) == []


def test_diff_and_diff_b_and_no_alpha():
    model = tiny_model(dtype=torch.float32)
    m = model.blocks[1].ffn[0]
    w0, b0 = m.weight.detach().clone(), m.bias.detach().clone()
    diff, diff_b = torch.randn_like(w0), torch.randn_like(b0)
    down, up = _ab(64, 64, 1)
    sd = {"blocks.1.ffn.0.diff": diff, "blocks.1.ffn.0.diff_b": diff_b,
          "blocks.1.cross_attn.k_img.lora_down.weight": down, "blocks.1.cross_attn.k_img.lora_up.weight": up}
    k0 = model.blocks[1].cross_attn.k_img.weight.detach().clone()
    lora.merge_loras(model, [(sd, 0.5)])
    assert torch.equal(m.weight, w0.float() + diff.float() * 0.5)
    assert torch.equal(m.bias, b0.float() + diff_b.float() * 0.5)
    assert torch.equal(model.blocks[1].cross_attn.k_img.weight, _expected(k0, down, up, 0.5, None))


def test_multiple_files_unknown_keys_reported(tmp_path, caplog):
    model = tiny_model(dtype=torch.float32)
    down, up = _ab(64, 64, 2)
    p1 = os.path.join(tmp_path, "a.safetensors")
    save_file({"blocks.0.self_attn.o.lora_A.weight": down, "blocks.0.self_attn.o.lora_B.weight": up,
               "blocks.0.self_attn.nonexistent.lora_A.weight": down.clone(),
               "text_encoder.foo.lora_A.weight": down.clone()}, p1)
    w0 = model.blocks[0].self_attn.o.weight.detach().clone()
    with caplog.at_level(logging.WARNING):
        res = lora.merge_loras(model, [(p1, 1.0), ({"blocks.0.self_attn.o.diff": torch.ones(64, 64)}, 2.0)])
    assert res[0].name == "a.safetensors"
    assert res[0].unknown == ["blocks.0.self_attn.nonexistent.lora_A.weight", "text_encoder.foo.lora_A.weight"]
    assert "a.safetensors" in caplog.text and "nonexistent" in caplog.text
    assert torch.equal(model.blocks[0].self_attn.o.weight, _expected(w0, down, up, 1.0, None) + 2.0)


def test_lora_for_another_model_raises(tmp_path):
    model = tiny_model()
    p = os.path.join(tmp_path, "sdxl_style.safetensors")
    save_file({"lora_unet_down_blocks_0_attn_to_q.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_down_blocks_0_attn_to_q.lora_up.weight": torch.zeros(8, 4)}, p)
    with pytest.raises(lora.LoraError, match="sdxl_style.safetensors: LoRA for another model"):
        lora.merge_loras(model, [(p, 1.0)])


def test_quantize_after_merge_order():
    """Merging before quantizing = quantize(W + delta); merging into an already-quantized layer
    re-quantizes from the dequantized weight, which differs (it also carries the first rounding)."""
    base = tiny_model(dtype=torch.bfloat16)
    name = "blocks.0.ffn.2"
    down, up = _ab(64, 128, 3)
    sd = {f"{name}.lora_A.weight": down * 0.01, f"{name}.lora_B.weight": up * 0.01}
    merged_first = copy.deepcopy(base)
    lora.merge_loras(merged_first, [(sd, 1.0)])
    w_merged = merged_first.get_submodule(name).weight.detach().clone()
    fo.quantize_model(merged_first, "fp8_e4m3fn_scaled", "cpu")
    q = merged_first.get_submodule(name)
    ref = fo.quantize_weight(w_merged, "fp8_e4m3fn_scaled")
    assert torch.equal(q.weight.view(torch.uint8), ref["weight"].view(torch.uint8))
    late = copy.deepcopy(base)
    fo.quantize_model(late, "fp8_e4m3fn_scaled", "cpu")
    lora.merge_loras(late, [(sd, 1.0)])
    assert isinstance(late.get_submodule(name), QuantLinear)
    assert placement.check_layout(late) == []
    err_first = (q.dequantized_weight(torch.float32) - w_merged.float()).norm()
    err_late = (late.get_submodule(name).dequantized_weight(torch.float32) - w_merged.float()).norm()
    assert err_first <= err_late


def test_merge_into_quantized_layer_keeps_its_fp8_matmul():
    base = tiny_model(dtype=torch.bfloat16)
    name = "blocks.0.ffn.2"
    down, up = _ab(64, 128, 3)
    fo.quantize_model(base, "fp8_e4m3fn_scaled", "cpu", fp8_matmul="accurate")
    lora.merge_loras(base, [({f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up}, 1.0)])
    assert base.get_submodule(name).fast_accum is False
