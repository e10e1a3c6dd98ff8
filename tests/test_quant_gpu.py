"""GPU paths: fused-input fp8 _scaled_mm vs the dequant path, NVFP4 compiled dequant."""
import copy

import pytest
import torch
from torch import nn

from wanvideo_infinitetalk import fp8_optimization as fo
from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.quant_linear import QuantLinear

from test_quant_support import cosine, tiny_inputs, tiny_model

pytestmark = pytest.mark.gpu


def _fp8_capable():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn_scaled", "fp8_e4m3fn"])
def test_scaled_mm_matches_dequant_and_is_used(fmt):
    ref = tiny_model(device="cuda")
    mm = copy.deepcopy(ref)
    dq = copy.deepcopy(ref)
    fo.quantize_model(mm, fmt, "cuda")
    fo.quantize_model(dq, fmt, "cuda", allow_scaled_mm=False)
    assert placement.check_layout(mm) == []
    layers = [m for m in mm.modules() if isinstance(m, QuantLinear)]
    assert all(m.path == "scaled_mm" for m in layers)
    x, a = tiny_inputs(device="cuda", tokens=40)
    with torch.no_grad():
        y_mm, y_dq, y_ref = mm(x, a), dq(x, a), ref(x, a)
    assert sum(m.scaled_mm_calls for m in layers) >= len(layers)
    assert cosine(y_mm, y_dq) >= 0.999
    assert cosine(y_mm, y_ref) >= 0.99


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
def test_static_input_scale_and_shape_fallback(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(40, 64).to(torch.bfloat16)   # K=40: not a multiple of 16 -> dequant path
    model = nn.Sequential(lin, nn.Linear(64, 32).to(torch.bfloat16))
    tensors, meta = fo.quantized_file_tensors({f"blocks.{k}": v for k, v in model.state_dict().items()},
                                              "comfy_fp8", input_scale=0.05)
    with torch.device("meta"):
        target = nn.Module()
        target.blocks = nn.Sequential(nn.Linear(40, 64), nn.Linear(64, 32))
    fo.load_quantized_state(target, tensors, meta, "cuda", materialize_rest=True)
    assert target.blocks[0].path == "dequant" and target.blocks[1].path == "scaled_mm"
    assert target.blocks[1].input_scaling == "static"
    x = torch.randn(8, 40, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y = target.blocks(x)
        y_ref = model.cuda()(x)
    assert target.blocks[1].scaled_mm_calls == 1
    assert cosine(y, y_ref) >= 0.99


def test_nvfp4_gpu_dequant_matches_cpu():
    ref = tiny_model()
    cpu = copy.deepcopy(ref)
    fo.quantize_model(cpu, "nvfp4", "cpu")
    gpu = copy.deepcopy(ref).cuda()
    fo.quantize_model(gpu, "nvfp4", "cuda")
    assert placement.check_layout(gpu) == []
    x, a = tiny_inputs()
    with torch.no_grad():
        y_cpu = cpu(x, a)
        y_gpu = gpu(x.cuda(), a.cuda()).cpu()
    assert cosine(y_cpu, y_gpu) >= 0.999
    assert cosine(y_gpu, ref(x, a)) >= 0.95


def test_storage_on_cpu_compute_on_cuda_decides_path():
    if not _fp8_capable():
        pytest.skip("needs sm_89+")
    model = tiny_model()
    fo.quantize_model(model, "fp8_e4m3fn_scaled", "cuda", storage_device="cpu")
    q = model.blocks[0].ffn[0]
    assert q.weight.device.type == "cpu" and q.path == "scaled_mm"
    placement.move_module(model, "cuda")
    x, a = tiny_inputs(device="cuda")
    with torch.no_grad():
        model(x, a)
    assert q.scaled_mm_calls == 1
