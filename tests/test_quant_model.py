"""quantize_model on a tiny block stack: error bounds, output similarity, layout."""
import copy

import pytest
import torch
from torch import nn

from wanvideo_infinitetalk import fp8_optimization as fo
from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.quant_linear import QuantLinear

from quant_support import cosine, tiny_inputs, tiny_model

# Per-layer relative (Frobenius) error of the dequantized weight vs the bf16 weight:
# - fp8 scaled: 3 mantissa bits -> <= 2^-4 per element, RMS ~0.036 for Gaussian-like weights.
# - fp8 weight-only (scale 1): nn.Linear init weights (|w| < 1/sqrt(fan_in) ~ 0.1) sit partly in
#   e4m3 subnormals (< 2^-6) where precision drops; bound 2^-3.
# - nvfp4: 1 mantissa bit + e4m3 block scale; RMS ~0.1 for uniform/Gaussian blocks; bound 0.15.
LAYER_BOUND = {"fp8_e4m3fn_scaled": 2 ** -4, "fp8_e4m3fn": 2 ** -3, "nvfp4": 0.15}
# Output cosine similarity vs the bf16 model (the acceptance numbers).
COS_BOUND = {"fp8_e4m3fn_scaled": 0.99, "fp8_e4m3fn": 0.99, "nvfp4": 0.95}


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("fmt", ["fp8_e4m3fn", "fp8_e4m3fn_scaled", "nvfp4"])
def test_quantize_model_error_similarity_layout(fmt):
    ref = tiny_model()
    model = copy.deepcopy(ref)
    rep = fo.quantize_model(model, fmt, "cpu")
    n_linear = sum(isinstance(m, nn.Linear) for n, m in ref.named_modules() if n.startswith("blocks."))
    assert rep["formats"] == {fmt: n_linear}
    assert rep["paths"] == {("nvfp4_dequant" if fmt == "nvfp4" else "dequant"): n_linear}
    assert type(model.head.head) is nn.Linear  # default include=("blocks",)
    assert placement.check_layout(model) == []
    ref_mods = dict(ref.named_modules())
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            assert "weight" in m._buffers and "weight_scale" in m._buffers
            w_ref = ref_mods[name].weight
            assert _rel(m.dequantized_weight(torch.float32), w_ref) < LAYER_BOUND[fmt], name
            assert torch.equal(m.bias, ref_mods[name].bias)
    x, a = tiny_inputs()
    with torch.no_grad():
        assert cosine(model(x, a), ref(x, a)) >= COS_BOUND[fmt]


def test_quantize_include_all_and_exclude():
    model = tiny_model()
    fo.quantize_model(model, "fp8_e4m3fn_scaled", "cpu", include=("all",),
                      exclude=("blocks.1.audio_cross_attn",))
    assert isinstance(model.head.head, QuantLinear)
    assert type(model.blocks[1].audio_cross_attn.kv_linear) is nn.Linear
    assert isinstance(model.blocks[0].audio_cross_attn.kv_linear, QuantLinear)


def test_none_is_a_no_op_and_bad_format_raises():
    model = tiny_model()
    fo.quantize_model(model, "none", "cpu")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    with pytest.raises(ValueError, match="unknown quantization format"):
        fo.quantize_model(model, "int4", "cpu")


def test_fp8_matmul_choice_reaches_every_layer_and_the_report():
    """On the CPU every fp8 layer dequantizes whatever is asked; the accumulation choice is still
    recorded per layer (it takes effect where `_scaled_mm` runs) and bad values are refused."""
    for choice, fast in (("fast", True), ("accurate", False), ("dequantize", False)):
        model = tiny_model()
        fo.quantize_model(model, "fp8_e4m3fn_scaled", "cpu", fp8_matmul=choice)
        layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
        assert layers and all(m.fast_accum is fast and m.path == "dequant" for m in layers)
        assert "fp8_matmul" not in fo.quant_report(model)  # no layer runs _scaled_mm here
    with pytest.raises(ValueError, match=r"fp8_matmul 'turbo'.*fast.*accurate.*dequantize"):
        fo.quantize_model(tiny_model(), "fp8_e4m3fn_scaled", "cpu", fp8_matmul="turbo")


def test_quant_report_names_the_scaled_mm_accumulation():
    def layer(fast):  # what build makes on an fp8 GPU (the report only reads the attributes)
        return QuantLinear(16, 16, "fp8_e4m3fn_scaled", "scaled_mm", fast_accum=fast)

    for fasts, want in (((True, True), "fast"), ((False, False), "accurate"),
                        ((True, False), "mixed")):
        model = nn.Sequential(*(layer(f) for f in fasts))
        assert fo.quant_report(model)["fp8_matmul"] == want
        assert f"fast_accum={fasts[0]}" in repr(model[0])


def test_fp8_scale_slot_only_for_cuda_scaled_mm_layers():
    """Norms fold an fp8 scale only for layers that quantize their input per tensor on CUDA;
    on the CPU (dequant path) or for plain nn.Linear there is no slot and nothing changes."""
    from wanvideo_infinitetalk.wanvideo.quant_linear import fp8_scale_slot

    model = tiny_model()
    fo.quantize_model(model, "fp8_e4m3fn_scaled", "cpu")
    q = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert fp8_scale_slot(q[:1], torch.zeros(2, q[0].in_features)) is None
    assert fp8_scale_slot((nn.Linear(4, 4),), torch.zeros(1, 4)) is None


def test_quantized_tensors_follow_module_moves():
    model = tiny_model()
    fo.quantize_model(model, "nvfp4", "cpu")
    placement.move_module(model, "cpu", dtype=torch.bfloat16)
    q = model.blocks[0].ffn[0]
    assert q.weight.dtype == torch.uint8 and q.weight_scale.dtype == torch.float8_e4m3fn
    assert placement.check_layout(model) == []
