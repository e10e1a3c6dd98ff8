"""Pre-quantized files in ComfyUI's conventions load as they are, aligned, and match bf16."""
import copy
import json
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors import safe_open
from torch import nn

from wanvideo_infinitetalk import fp8_optimization as fo
from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.quant_linear import QuantLinear

from quant_support import TinyWan, cosine, tiny_inputs, tiny_model

FILE_FORMATS = {  # writer format -> (internal format, detected kind, cosine bound)
    "fp8_e4m3fn": ("fp8_e4m3fn", "fp8", 0.99),
    "fp8_scaled": ("fp8_e4m3fn_scaled", "scaled_fp8", 0.99),
    "fp8_scaled_fullprec": ("fp8_e4m3fn_scaled", "scaled_fp8", 0.99),
    "comfy_fp8": ("fp8_e4m3fn_scaled", "comfy_quant", 0.99),
    "comfy_fp8_e5m2": ("fp8_e5m2", "comfy_quant", 0.98),  # 2 mantissa bits: coarser than e4m3
    "comfy_nvfp4": ("nvfp4", "comfy_quant", 0.95),
}


def _meta_model():
    with torch.device("meta"):
        return TinyWan()


def _read(path, how):
    if how == "views":
        return fo.read_safetensors_views(path)
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


@pytest.mark.parametrize("fmt", list(FILE_FORMATS))
@pytest.mark.parametrize("marker", ["tensor", "metadata"])
def test_load_each_format(tmp_path, fmt, marker):
    internal, kind, bound = FILE_FORMATS[fmt]
    if marker == "metadata" and kind != "comfy_quant":
        pytest.skip("metadata marker only exists for comfy_quant files")
    ref = tiny_model()
    sd = {"model.diffusion_model." + k: v for k, v in ref.state_dict().items()}
    path = os.path.join(tmp_path, "q.safetensors")
    fo.write_quantized_file(sd, fmt, path, marker=marker)
    tensors, meta = _read(path, "safetensors")
    det = fo.detect_quantization(tensors, meta)
    n_lin = sum(isinstance(m, nn.Linear) for n, m in ref.named_modules() if n.startswith("blocks."))
    assert det["kind"] == kind and det["counts"] == {internal: n_lin}
    assert det["full_precision_mm"] == (fmt == "fp8_scaled_fullprec")
    model = _meta_model()
    res = fo.load_quantized_state(model, tensors, meta, "cpu", materialize_rest=True)
    assert placement.check_layout(model) == []
    assert not any(k.endswith((".comfy_quant", ".weight_scale", ".scale_weight")) and
                   k not in res["consumed_keys"] for k in tensors)
    assert isinstance(model.blocks[0].ffn[2], QuantLinear) and type(model.head.head) is nn.Linear
    assert model.blocks[0].ffn[2].fmt == internal
    x, a = tiny_inputs()
    with torch.no_grad():
        assert cosine(model(x, a), ref(x, a)) >= bound


def test_detect_from_keys_and_header_dtypes(tmp_path):
    ref = tiny_model()
    tensors, meta = fo.quantized_file_tensors(ref.state_dict(), "fp8_e4m3fn")
    dtypes = {k: v.dtype for k, v in tensors.items()}
    det = fo.detect_quantization(list(tensors), None, dtypes=dtypes)
    assert det["kind"] == "fp8" and det["counts"] == {"fp8_e4m3fn": 30}
    assert fo.detect_quantization(list(ref.state_dict()), None)["kind"] == "none"


def test_unsupported_format_named():
    meta = {"_quantization_metadata": json.dumps({"format_version": "1.0",
                                                   "layers": {"blocks.0.ffn.0": "mxfp8"}})}
    with pytest.raises(fo.QuantFormatError, match="blocks.0.ffn.0.*mxfp8"):
        fo.detect_quantization([], meta)


def test_quantized_file_matches_quantize_model():
    """A file written by the writer and the in-memory conversion dequantize identically."""
    ref = tiny_model()
    a = copy.deepcopy(ref)
    fo.quantize_model(a, "nvfp4", "cpu")
    tensors, meta = fo.quantized_file_tensors(ref.state_dict(), "comfy_nvfp4")
    b = _meta_model()
    fo.load_quantized_state(b, tensors, meta, "cpu", materialize_rest=True)
    for name in ("blocks.0.self_attn.q", "blocks.1.audio_cross_attn.kv_linear"):
        wa = a.get_submodule(name).dequantized_weight(torch.float32)
        wb = b.get_submodule(name).dequantized_weight(torch.float32)
        assert torch.equal(wa, wb)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt=st.sampled_from(["comfy_fp8", "comfy_nvfp4", "fp8_scaled"]), pad=st.integers(0, 15),
       seed=st.integers(0, 1000))
def test_misaligned_file_offsets_load_aligned(tmp_path, fmt, pad, seed):
    ref = tiny_model(layers=1)
    tensors, _ = fo.quantized_file_tensors(ref.state_dict(), fmt)
    order = list(tensors)
    g = torch.Generator().manual_seed(seed)
    order = [order[i] for i in torch.randperm(len(order), generator=g).tolist()]
    path = os.path.join(tmp_path, f"m{seed}_{pad}.safetensors")
    offsets = fo.write_quantized_file(ref.state_dict(), fmt, path, header_pad=pad, order=order)
    mods = {o % 16 for o in offsets.values()}
    assert mods - {0}, "the file should place tensors off 16-byte boundaries"
    views, meta = fo.read_safetensors_views(path)
    assert any(v.data_ptr() % 16 for v in views.values() if v.numel())  # really misaligned
    with torch.device("meta"):
        model = TinyWan(layers=1)
    fo.load_quantized_state(model, views, meta, "cpu", materialize_rest=True)
    assert placement.check_layout(model) == []
    for v in views.values():  # nothing in the model aliases the file buffer
        if v.numel():
            assert all(t.data_ptr() != v.data_ptr() for _, t in placement.named_tensors(model))


def test_wanmodel_quantize_and_forward():
    from wanvideo_infinitetalk.wanvideo.model import WanModel
    from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_T2V, random_state_dict

    sd = random_state_dict(TINY_T2V)
    ref = WanModel(TINY_T2V)
    ref.load_state_dict(sd)
    ref = ref.to(torch.bfloat16).eval()
    model = copy.deepcopy(ref)
    rep = fo.quantize_model(model, "fp8_e4m3fn_scaled", "cpu")
    assert rep["formats"]["fp8_e4m3fn_scaled"] == 2 * 10  # q,k,v,o x2 + ffn.0, ffn.2 per block
    assert placement.check_layout(model) == []
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 1, 4, 4, generator=g)
    ctx = torch.randn(1, 8, 4096, generator=g).to(torch.bfloat16)
    t = torch.tensor([500.0])
    with torch.no_grad():
        assert cosine(model(x, t, ctx), ref(x, t, ctx)) >= 0.99
