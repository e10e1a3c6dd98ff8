"""GPU paths: fused-input fp8 _scaled_mm vs the dequant path, NVFP4 compiled dequant."""
import copy

import pytest
import torch
from torch import nn

from wanvideo_infinitetalk import fp8_optimization as fo
from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.quant_linear import QuantLinear

from quant_support import cosine, tiny_inputs, tiny_model

pytestmark = pytest.mark.gpu


def _fp8_capable():
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
@pytest.mark.parametrize("fp8_matmul", ["fast", "accurate"])
@pytest.mark.parametrize("fmt", ["fp8_e4m3fn_scaled", "fp8_e4m3fn"])
def test_scaled_mm_matches_dequant_and_is_used(monkeypatch, fmt, fp8_matmul):
    ref = tiny_model(device="cuda")
    mm = copy.deepcopy(ref)
    dq = copy.deepcopy(ref)
    fo.quantize_model(mm, fmt, "cuda", fp8_matmul=fp8_matmul)
    fo.quantize_model(dq, fmt, "cuda", fp8_matmul="dequantize")
    assert placement.check_layout(mm) == []
    layers = [m for m in mm.modules() if isinstance(m, QuantLinear)]
    assert all(m.path == "scaled_mm" for m in layers)
    assert all(m.path == "dequant" for m in dq.modules() if isinstance(m, QuantLinear))
    assert fo.quant_report(mm)["fp8_matmul"] == fp8_matmul
    seen = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_fast_accum"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    x, a = tiny_inputs(device="cuda", tokens=40)
    with torch.no_grad():
        y_mm, y_dq, y_ref = mm(x, a), dq(x, a), ref(x, a)
    assert sum(m.scaled_mm_calls for m in layers) >= len(layers)
    # the kernel really ran, with the accumulation asked for, and only for the scaled_mm model
    assert len(seen) == sum(m.scaled_mm_calls for m in layers)
    assert set(seen) == {fp8_matmul == "fast"}
    assert cosine(y_mm, y_dq) >= 0.999
    assert cosine(y_mm, y_ref) >= 0.99


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
def test_fast_accumulation_error_stays_at_bf16_output_rounding():
    """The longest reduction of the 14B model (ffn.2, K = 13824): against the exact fp32 product of
    the same fp8 operands, fp32 accumulation is off by bf16 output rounding (~2^-9 relative) and
    fast accumulation by at most about twice that; the fp8 rounding of the operands (~2^-4 per
    element) is far larger than either."""
    g = torch.Generator(device="cuda").manual_seed(0)
    k, n = 13824, 256
    w = torch.randn(n, k, device="cuda", generator=g) / k ** 0.5
    x = torch.randn(1024, k, device="cuda", generator=g).bfloat16()
    layers = {mode: QuantLinear.build(fmt="fp8_e4m3fn_scaled", bias=None, shape=(n, k), device="cuda",
                                      fast_accum=mode == "fast",
                                      **fo.quantize_weight(w, "fp8_e4m3fn_scaled"))
              for mode in ("fast", "accurate")}
    xq, sx = layers["fast"].quantize_input(x)
    exact = (xq.float() * sx) @ layers["fast"].dequantized_weight(torch.float32).t()
    err = {}
    with torch.no_grad():
        for mode, layer in layers.items():
            assert layer.path == "scaled_mm"
            err[mode] = ((layer(x).float() - exact).norm() / exact.norm()).item()
    assert err["accurate"] <= 3e-3, err
    assert err["fast"] <= 5e-3 and err["fast"] <= 2.5 * err["accurate"], err


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


# ---------------------------------------------------------------- shared / fused input quantization
def _spy_quantizers(monkeypatch) -> dict:
    """Calls of the fp8 input quantizers from now on: per tensor ("plain", "gelu"; "cast_only"
    where the scale came folded) and per row ("rows", "gelu_rows")."""
    from wanvideo_infinitetalk.wanvideo import quant_kernels as qk

    counts = dict.fromkeys(("plain", "gelu", "gelu_rows", "rows", "cast_only"), 0)
    plain, gelu, rows = (qk.quantize_tensor_triton, qk.quantize_gelu_tanh_triton,
                         qk.quantize_rows_triton)

    def spy(name, fn):
        def wrapped(x2, scale):
            counts[name] += 1
            counts["cast_only"] += scale is not None
            return fn(x2, scale)
        return wrapped

    def spy_rows(x2, gelu=False):
        counts["gelu_rows" if gelu else "rows"] += 1
        return rows(x2, gelu)
    monkeypatch.setattr(qk, "quantize_tensor_triton", spy("plain", plain))
    monkeypatch.setattr(qk, "quantize_gelu_tanh_triton", spy("gelu", gelu))
    monkeypatch.setattr(qk, "quantize_rows_triton", spy_rows)
    return counts


def _tiny_inputs():
    """(latents, timestep, text context) on the GPU for _tiny_wan_fp8's model."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 8, 8, generator=g).cuda()
    ctx = torch.randn(1, 8, 4096, generator=g).to(torch.bfloat16).cuda()
    return x, torch.tensor([500.0], device="cuda"), ctx


def _tiny_wan_fp8(allow_scaled_mm=True):
    from wanvideo_infinitetalk.wanvideo.model import WanModel
    from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_T2V, random_state_dict

    model = WanModel(TINY_T2V)
    model.load_state_dict(random_state_dict(TINY_T2V))
    model = model.to(torch.bfloat16).cuda().eval()
    ref = copy.deepcopy(model)
    fo.quantize_model(model, "fp8_e4m3fn_scaled", "cuda", allow_scaled_mm=allow_scaled_mm)
    return model, ref


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
def test_triton_scale_is_amax_over_448():
    from wanvideo_infinitetalk.wanvideo import quant_kernels as qk

    g = torch.Generator(device="cuda").manual_seed(0)
    base = torch.randn(77, 3000, device="cuda", generator=g).bfloat16() * 5
    for x in (base, base[:, 100:2900]):  # odd row count (not a multiple of 8), strided rows
        q, s = qk.quantize_tensor_triton(x, None)
        want = (x.float().abs().amax() / 448.0).clamp_min(1e-12)
        torch.testing.assert_close(s, want, rtol=1e-6, atol=0)
        ref = (x.float() / want).clamp(-448, 448).to(torch.float8_e4m3fn)
        # the kernel multiplies by 1/s: a rare element may round the other way
        assert (q.view(torch.uint8) == ref.view(torch.uint8)).float().mean().item() >= 0.999
    q, s = qk.quantize_tensor_triton(torch.zeros(5, 64, device="cuda", dtype=torch.bfloat16), None)
    assert s.item() == pytest.approx(1e-12) and not q.float().any()


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
def test_shared_qkv_quantization_equals_per_layer():
    from wanvideo_infinitetalk.wanvideo.quant_linear import shared_input_quantization

    model, _ = _tiny_wan_fp8()
    attn = model.blocks[0].self_attn
    x = torch.randn(1, 50, 256, device="cuda").bfloat16()
    xq = shared_input_quantization((attn.q, attn.k, attn.v), x)
    assert xq is not None
    with torch.no_grad():
        for lin in (attn.q, attn.k, attn.v):
            own_q, own_s = lin.quantize_input(x)
            assert torch.equal(own_s, xq[1])
            assert torch.equal(own_q.view(torch.uint8), xq[0].view(torch.uint8))
            calls = lin.scaled_mm_calls
            assert torch.equal(lin(x, quantized=xq), lin(x))
            assert lin.scaled_mm_calls == calls + 2
    # not shared off the scaled_mm path, nor on the CPU
    dq, _ = _tiny_wan_fp8(allow_scaled_mm=False)
    a = dq.blocks[0].self_attn
    assert shared_input_quantization((a.q, a.k, a.v), x) is None
    assert shared_input_quantization((attn.q, attn.k, attn.v), x.cpu()) is None


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
@pytest.mark.parametrize("static", [False, True])
def test_fused_gelu_quantization_matches_torch(static):
    import torch.nn.functional as F

    from wanvideo_infinitetalk.wanvideo import quant_kernels as qk

    g = torch.Generator(device="cuda").manual_seed(1)
    h = (torch.randn(37, 2064, device="cuda", generator=g) * 3).bfloat16()
    h[0, :8] = torch.tensor([-20.0, -9.0, -5.0, -1e-3, 0.0, 1e-3, 5.0, 20.0])
    gelu = F.gelu(h, approximate="tanh")
    sc = torch.tensor(0.02, device="cuda") if static else None
    q_ref, s_ref = qk.quantize_tensor_triton(gelu, sc)
    q, s = qk.quantize_gelu_tanh_triton(h, sc)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    same = (q.view(torch.uint8) == q_ref.view(torch.uint8)).float().mean().item()
    assert same >= 0.995
    deq, deq_ref = q.float() * s, q_ref.float() * s_ref
    # at most one fp8 step apart (relative step 2^-3; subnormal step 2^-9 in scale units)
    torch.testing.assert_close(deq, deq_ref, rtol=0.13, atol=float(s_ref) * 2 ** -8)
    torch.testing.assert_close(deq, gelu.float().clamp(-448 * float(s_ref), 448 * float(s_ref)),
                               rtol=0.07, atol=float(s_ref) * 2 ** -8)


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
@pytest.mark.parametrize("fused", ["1", "0"])
def test_wanmodel_fp8_shared_and_gelu_fused(monkeypatch, fused):
    """With quant_linear.DYNAMIC_ROWS off: per-tensor scales where no kernel writes rows."""
    from wanvideo_infinitetalk.wanvideo import model as model_mod
    from wanvideo_infinitetalk.wanvideo import quant_linear

    monkeypatch.setattr(quant_linear, "DYNAMIC_ROWS", False)
    monkeypatch.setenv("WANVIDEO_FUSED", fused)
    mm, ref = _tiny_wan_fp8()
    dq, _ = _tiny_wan_fp8(allow_scaled_mm=False)
    layers = [m for m in mm.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.path == "scaled_mm" for m in layers)
    counts = _spy_quantizers(monkeypatch)
    x, t, ctx = _tiny_inputs()
    with torch.no_grad():
        y_mm, y_dq, y_ref = mm(x, t, ctx), dq(x, t, ctx), ref(x, t, ctx)
    n_blocks = len(mm.blocks)
    calls = sum(m.scaled_mm_calls for m in layers)
    assert calls == 10 * n_blocks  # every block linear went through _scaled_mm once
    # ffn.2's input: gelu(ffn.0(x)) quantized per row in one pass, fused or not
    assert counts["gelu_rows"] == n_blocks and counts["gelu"] == 0 and counts["rows"] == 0
    if fused == "1":
        # the norms write q/k/v's and cross-attention q's inputs as fp8 rows (no quantizer
        # call), ffn.0's norm folds its per-tensor scale (cast only)
        assert counts["plain"] == calls - 5 * n_blocks
        assert counts["cast_only"] == n_blocks
    else:
        assert counts["plain"] == calls - 2 * n_blocks - n_blocks  # q, k, v share one
        assert counts["cast_only"] == 0
    assert cosine(y_mm, y_dq) >= 0.999
    assert cosine(y_mm, y_ref) >= 0.99
    if fused == "1":  # per-tensor instead of per-row inputs: quantization noise apart
        monkeypatch.setattr(model_mod, "fp8_rows_input", lambda layers, x: False)
        with torch.no_grad():
            y_tensor = mm(x, t, ctx)
        assert cosine(y_tensor, y_mm) >= 0.999
        # and folding the per-tensor scale in the norm changes no bit of that result
        monkeypatch.setattr(model_mod, "fp8_scale_slot", lambda layers, x: None)
        with torch.no_grad():
            assert torch.equal(mm(x, t, ctx), y_tensor)


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
@pytest.mark.parametrize("fused", ["1", "0"])
def test_wanmodel_fp8_every_dynamic_input_per_row(monkeypatch, fused):
    """quant_linear.DYNAMIC_ROWS (the default): no per-tensor quantization is left (no
    reduction, nothing to agree between ranks); the norms write q/k/v's, cross-attention q's and
    ffn.0's inputs as fp8 rows (fused), the row quantizer takes o and cross-attention k, v and o
    (and with the torch norms every input but ffn.2's, which the GELU pass quantizes per row
    either way)."""
    from wanvideo_infinitetalk.wanvideo import quant_linear

    monkeypatch.setenv("WANVIDEO_FUSED", fused)
    mm, _ = _tiny_wan_fp8()
    dq, _ = _tiny_wan_fp8(allow_scaled_mm=False)
    x, t, ctx = _tiny_inputs()
    assert quant_linear.DYNAMIC_ROWS
    with torch.no_grad():
        monkeypatch.setattr(quant_linear, "DYNAMIC_ROWS", False)
        y_tensor = mm(x, t, ctx)
        monkeypatch.setattr(quant_linear, "DYNAMIC_ROWS", True)
        counts = _spy_quantizers(monkeypatch)
        y_rows, y_dq = mm(x, t, ctx), dq(x, t, ctx)
    n_blocks = len(mm.blocks)
    assert counts["plain"] == counts["gelu"] == 0 and counts["gelu_rows"] == n_blocks
    assert counts["rows"] == (4 if fused == "1" else 7) * n_blocks
    assert cosine(y_rows, y_dq) >= 0.999
    assert cosine(y_rows, y_tensor) >= 0.999


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
@pytest.mark.parametrize("gelu", [False, True])
def test_row_quantization_matches_torch(gelu):
    import torch.nn.functional as F

    from wanvideo_infinitetalk.wanvideo import quant_kernels as qk

    g = torch.Generator(device="cuda").manual_seed(3)
    base = (torch.randn(41, 13824, device="cuda", generator=g) * 3).bfloat16()
    base[5] = 0   # an all-zero row: the floor scale, zeros out
    base[6, 7] = 900.0   # one large value sets its row's scale only
    for h in (base, base[:, 100:5220]):   # strided rows
        v = F.gelu(h, approximate="tanh") if gelu else h
        want = (v.float().abs().amax(dim=1, keepdim=True) / 448.0).clamp_min(1e-12)
        q, s = qk.quantize_rows_triton(h, gelu=gelu)
        assert q.dtype == torch.float8_e4m3fn and q.is_contiguous() and s.shape == (h.shape[0], 1)
        torch.testing.assert_close(s, want, rtol=1e-6, atol=0)
        ref = (v.float() * (1.0 / want)).clamp(-448, 448).to(torch.float8_e4m3fn)
        same = (q.view(torch.uint8) == ref.view(torch.uint8)).float().mean().item()
        assert same >= (0.995 if gelu else 0.999)   # tanh / division rounding, now and then
        assert not q[5].float().any() and s[5].item() == pytest.approx(1e-12)
    with pytest.raises(ValueError, match="rows of at most 16384"):
        qk.quantize_rows_triton(torch.zeros(2, 16385, device="cuda", dtype=torch.bfloat16))


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
def test_norm_written_fp8_rows_equal_the_norm_then_row_quantization():
    """fused_ops' fp8_rows: the LayerNorm pass writes exactly what writing h and quantizing its
    rows would give, for the modulated and the residual + affine norms."""
    from wanvideo_infinitetalk.wanvideo import fused_ops, quant_kernels as qk

    g = torch.Generator(device="cuda").manual_seed(4)
    x = torch.randn(2, 300, 1024, device="cuda", generator=g) * 2 + 0.5
    y = torch.randn(2, 300, 1024, device="cuda", generator=g).bfloat16()
    mod = torch.randn(2, 6, 1024, device="cuda", generator=g)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    w, bias = 1 + 0.1 * mod[0, 3], 0.1 * mod[0, 4]
    for dtype in (torch.bfloat16, torch.float16):
        h = fused_ops.modulated_layer_norm(x, shift, scale, dtype, 1e-6)
        q, s = fused_ops.modulated_layer_norm(x, shift, scale, dtype, 1e-6, fp8_rows=True)
        q_ref, s_ref = qk.quantize_rows_triton(h.reshape(-1, 1024))
        assert torch.equal(s, s_ref) and torch.equal(q.view(torch.uint8).reshape(-1, 1024),
                                                     q_ref.view(torch.uint8))
        new, h = fused_ops.residual_layer_norm(x, y, gate, dtype, 1e-6, w, bias, inplace=False)
        new_q, (q, s) = fused_ops.residual_layer_norm(x, y, gate, dtype, 1e-6, w, bias,
                                                      inplace=False, fp8_rows=True)
        q_ref, s_ref = qk.quantize_rows_triton(h.reshape(-1, 1024))
        assert torch.equal(new_q, new) and torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.uint8).reshape(-1, 1024), q_ref.view(torch.uint8))
    with pytest.raises(ValueError, match="fp8_rows needs norm=True"):
        fused_ops.modulated_layer_norm(x, shift, scale, torch.float32, 1e-6, fp8_rows=True)


@pytest.mark.skipif(not _fp8_capable(), reason="fp8 tensor cores need sm_89+")
def test_scaled_mm_with_row_scales_matches_the_dequantized_product():
    from wanvideo_infinitetalk.wanvideo import quant_kernels as qk

    model, _ = _tiny_wan_fp8()
    lin = model.blocks[0].self_attn.q
    x = (torch.randn(1, 77, 256, device="cuda") * torch.linspace(0.1, 30, 77, device="cuda")
         [None, :, None]).bfloat16()   # rows of very different ranges
    q, s = qk.quantize_rows_triton(x.reshape(-1, 256))
    with torch.no_grad():
        out = lin(q.view(1, 77, 256), quantized=lin.quantize_input(q.view(1, 77, 256), s))
        want = (q.float() * s) @ lin.dequantized_weight(torch.float32).t() + lin.bias.float()
    torch.testing.assert_close(out.float().reshape(77, -1), want, rtol=2e-2,
                               atol=2e-2 * want.abs().max().item())
    with pytest.raises(ValueError, match="needs its row scales"):
        lin.quantize_input(q.view(1, 77, 256), None)
