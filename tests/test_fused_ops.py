"""Fused Triton RMSNorm+RoPE / LayerNorm(+modulation) kernels against the torch reference paths."""
import pytest
import torch
import torch.nn.functional as F
import triton_interpreter

from wanvideo_infinitetalk.wanvideo import fused_ops, model as model_mod
from wanvideo_infinitetalk.wanvideo.rope import angle_table, apply_rope, cos_sin, grid_angles, rotations
from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict
from test_parity_diffusers import inputs, ours

HEADS, HEAD_DIM = 2, 128
DIM = HEADS * HEAD_DIM
GRIDS = [(3, 5, 7), (5, 9, 23)]  # 105 and 1035 tokens: no block-size multiples


def _tol(dtype):
    return dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)


def _rope_ref(x, w, eps, rot):
    b, seq, dim = x.shape
    normed = F.rms_norm(x.float(), (dim,), w.float(), eps).to(x.dtype)
    return apply_rope(normed.view(b, seq, HEADS, -1), rot).view(b, seq, dim)


def _case(batch, grid, dtype, device):
    g = torch.Generator().manual_seed(batch * 1000 + grid[2])
    seq = grid[0] * grid[1] * grid[2]
    x = (3 * torch.randn(batch, seq, DIM, generator=g) + 0.3).to(dtype).to(device)
    w = (1 + 0.1 * torch.randn(DIM, generator=g)).to(device)
    rot = rotations(grid_angles(angle_table(HEAD_DIM), grid, HEAD_DIM), device)
    resid = (2 * torch.randn(batch, seq, DIM, generator=g) + 0.5).to(device)
    mod = torch.randn(batch, 6, DIM, generator=g).to(device)
    return x, w, rot, resid, mod


def _fp8_scale(h):
    """The per-tensor fp8 scale of h as quant_kernels computes it: clamp_min(max|h| / 448, 1e-12)."""
    return (h.float().abs().amax() / 448.0).clamp_min(1e-12)


def _check_amax(make_h, device):
    """make_h(amax_to) runs a fused LayerNorm; the scale it folds equals the one computed from its
    stored output, bit for bit, and the output itself does not change."""
    from wanvideo_infinitetalk.wanvideo.quant_kernels import scale_accumulator

    plain = make_h(None)
    acc = scale_accumulator(device)
    h = make_h(acc)
    assert torch.equal(h, plain)
    assert torch.equal(acc, _fp8_scale(h)), (acc, _fp8_scale(h))


def _row_quant_ref(h, gelu=False):
    """Per-row fp8 of h as quant_kernels.quantize_rows_triton defines it, in torch."""
    v = F.gelu(h, approximate="tanh") if gelu else h
    s = (v.float().abs().amax(dim=-1, keepdim=True) / 448.0).clamp_min(1e-12)
    return (v.float() * (1.0 / s)).clamp(-448, 448).to(torch.float8_e4m3fn), s


def _same_fp8(a, b, share):
    """Mostly the same fp8 codes, the rest one step apart. Triton's interpreter (not the GPU:
    tests/test_quant_gpu.py holds the GPU to bit equality) also casts a value that rounds up
    into the next binade to the bottom of its own (31.3 -> 16 instead of 32): allowed where b
    is a power of two and a is half of it."""
    a, b = a.float(), b.float()
    carry = (a * 2 == b) & (torch.frexp(b)[0].abs() == 0.5)
    a = torch.where(carry, b, a)
    torch.testing.assert_close(a, b, rtol=0.13, atol=2 ** -9)
    return (a == b).float().mean().item() >= share


def _check_rows(device):
    """fp8_rows: a norm pass writes its rows as fp8 with per-row scales, as quantizing the
    bf16 output it would otherwise write; quantize_rows_triton likewise (also with GELU)."""
    from wanvideo_infinitetalk.wanvideo import quant_kernels as qk

    _, w, _, x, mod = _case(2, GRIDS[0], torch.bfloat16, device)
    y = (2 * x).bfloat16()
    shift, scale, gate = mod.chunk(6, dim=1)[:3]
    h = fused_ops.modulated_layer_norm(x, shift, scale, torch.bfloat16, 1e-6)
    q, s = fused_ops.modulated_layer_norm(x, shift, scale, torch.bfloat16, 1e-6, fp8_rows=True)
    q_ref, s_ref = _row_quant_ref(h.reshape(-1, DIM))
    assert q.shape == x.shape and s.shape == (x.shape[0] * x.shape[1], 1)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert _same_fp8(q.reshape(-1, DIM), q_ref, 0.95)
    new, h = fused_ops.residual_layer_norm(x, y, gate, torch.bfloat16, 1e-6, w, None,
                                           inplace=False)
    new_q, (q, s) = fused_ops.residual_layer_norm(x, y, gate, torch.bfloat16, 1e-6, w, None,
                                                  inplace=False, fp8_rows=True)
    q_ref, s_ref = _row_quant_ref(h.reshape(-1, DIM))
    assert torch.equal(new_q, new)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert _same_fp8(q.reshape(-1, DIM), q_ref, 0.95)
    # the modulated residual norm (ffn.0's input with quant_linear.DYNAMIC_ROWS) likewise
    _, h_mod = fused_ops.residual_layer_norm(x, y, None, torch.bfloat16, 1e-6, shift=shift,
                                             scale=scale, inplace=False)
    _, (q, s) = fused_ops.residual_layer_norm(x, y, None, torch.bfloat16, 1e-6, shift=shift,
                                              scale=scale, inplace=False, fp8_rows=True)
    q_ref, s_ref = _row_quant_ref(h_mod.reshape(-1, DIM))
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert _same_fp8(q.reshape(-1, DIM), q_ref, 0.95)
    for gelu in (False, True):
        q, s = qk.quantize_rows_triton(h.reshape(-1, DIM), gelu=gelu)
        q_ref, s_ref = _row_quant_ref(h.reshape(-1, DIM), gelu)
        # GELU's bf16 rounding: the interpreter truncates (one bf16 step, 2^-7, on the scale)
        torch.testing.assert_close(s, s_ref, rtol=8e-3 if gelu else 1e-6, atol=0)
        if gelu:   # the codes against the kernel's own scales
            g = F.gelu(h.reshape(-1, DIM), approximate="tanh").float()
            q_ref = (g * (1.0 / s)).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert _same_fp8(q, q_ref, 0.95)


def _check_ops(batch, grid, dtype, device):
    x, w, rot, resid, mod = _case(batch, grid, dtype, device)
    cos, sin = cos_sin(rot)
    tol = _tol(dtype)
    y = fused_ops.rms_norm_rope(x, w, 1e-6, cos, sin, HEADS)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y.float(), _rope_ref(x, w, 1e-6, rot).float(), **tol)
    torch.testing.assert_close(fused_ops.rms_norm(x, w, 1e-6).float(),
                               F.rms_norm(x.float(), (DIM,), w, 1e-6).to(dtype).float(), **tol)
    shift, scale = mod.chunk(6, dim=1)[:2]  # strided views, as in WanBlock
    y = fused_ops.modulated_layer_norm(resid, shift, scale, dtype, 1e-6)
    ref = torch.addcmul(shift, F.layer_norm(resid, (DIM,), eps=1e-6), 1 + scale).to(dtype)
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref.float(), **tol)
    _check_amax(lambda acc: fused_ops.modulated_layer_norm(resid, shift, scale, dtype, 1e-6,
                                                           amax_to=acc), device)
    with pytest.raises(ValueError, match="amax_to must be a one-element fp32 tensor"):
        fused_ops.modulated_layer_norm(resid, shift, scale, dtype, 1e-6,
                                       amax_to=torch.zeros(2, device=device))
    bias = 0.1 * mod[:, 0].mean(0)
    y = fused_ops.layer_norm(resid, w, bias, 1e-6, dtype)
    torch.testing.assert_close(y.float(), F.layer_norm(resid, (DIM,), w, bias, 1e-6).to(dtype).float(),
                               **tol)


def _check_residual(batch, grid, device):
    """gated_residual_ / residual_layer_norm against addcmul / add_ (+ the norm) in torch."""
    y, w, _, x, mod = _case(batch, grid, torch.bfloat16, device)
    shift, scale, gate = mod.chunk(6, dim=1)[:3]  # strided [B, 1, C] views, as in WanBlock
    bias = 0.1 * mod[:, 3].mean(0)

    def close_fp32(a, ref):  # fp32 residual: equal up to an fma's single rounding
        torch.testing.assert_close(a, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())

    for g in (gate, gate[:1], None):
        ref = torch.addcmul(x, y, g) if g is not None else x.clone().add_(y)
        out = x.clone()
        assert fused_ops.gated_residual_(out, y, g) is out
        close_fp32(out, ref)
        keep = x.clone()
        new, h = fused_ops.residual_layer_norm(x, y, g, torch.bfloat16, 1e-6, w, bias, inplace=False)
        assert torch.equal(x, keep) and new.data_ptr() != x.data_ptr()
        close_fp32(new, ref)
        torch.testing.assert_close(h.float(), F.layer_norm(ref, (DIM,), w, bias, 1e-6).bfloat16().float(),
                                   **_tol(torch.bfloat16))
        _check_amax(lambda acc: fused_ops.residual_layer_norm(x, y, g, torch.bfloat16, 1e-6, w, bias,
                                                              inplace=False, amax_to=acc)[1], device)
        out = x.clone()
        new, h = fused_ops.residual_layer_norm(out, y, g, torch.bfloat16, 1e-6, shift=shift, scale=scale)
        assert new is out and h.dtype == torch.bfloat16
        close_fp32(out, ref)
        href = torch.addcmul(shift, F.layer_norm(ref, (DIM,), eps=1e-6), 1 + scale).bfloat16()
        torch.testing.assert_close(h.float(), href.float(), **_tol(torch.bfloat16))
        _check_amax(lambda acc: fused_ops.residual_layer_norm(
            x, y, g, torch.bfloat16, 1e-6, shift=shift, scale=scale, inplace=False,
            amax_to=acc)[1], device)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_residual_kernels_match_torch_cuda(grid, batch):
    _check_residual(batch, grid, "cuda")


class _FakeAudio(torch.nn.Module):
    """Stands in for InfiniteTalk's audio cross-attention: any function of its normed input."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(DIM, DIM)

    def forward(self, h, audio_ctx, grid, qk=None):
        return self.proj(h)


@pytest.mark.gpu
def test_block_fused_matches_unfused_with_audio_slot_cuda(monkeypatch):
    """One WanBlock with the InfiniteTalk slots filled: the fused path (every residual update
    through fused_ops) matches the torch path, and leaves the caller's x untouched."""
    torch.manual_seed(0)
    cfg = TINY_I2V
    block = model_mod.WanBlock(cfg)
    block.norm_x = model_mod.WanLayerNorm(cfg.dim, cfg.eps, elementwise_affine=True)
    torch.nn.init.normal_(block.norm_x.weight, 1, 0.1)
    torch.nn.init.normal_(block.norm3.weight, 1, 0.1)
    block.audio_cross_attn = _FakeAudio()
    block = block.cuda().bfloat16()
    grid = (3, 4, 5)
    seq = grid[0] * grid[1] * grid[2]
    x = torch.randn(2, seq, cfg.dim, device="cuda")
    e = 0.1 * torch.randn(2, 6, cfg.dim, device="cuda")
    rope = rotations(grid_angles(angle_table(cfg.head_dim), grid, cfg.head_dim), "cuda")
    ctx = torch.randn(2, 257 + 16, cfg.dim, device="cuda").bfloat16()
    keep = x.clone()
    outs = []
    with torch.no_grad():
        for switch in ("1", "0"):
            monkeypatch.setenv("WANVIDEO_FUSED", switch)
            outs.append(block(x, e, grid, rope, ctx, 257, torch.bfloat16, audio_ctx=object()))
            assert torch.equal(x, keep)
    fused, ref = outs
    assert fused.dtype == torch.float32 and torch.isfinite(fused).all()
    err = (fused - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), err


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_fused_kernels_match_torch_cuda(grid, batch, dtype):
    assert fused_ops.enabled(torch.empty(1, device="cuda"))
    _check_ops(batch, grid, dtype, "cuda")


@pytest.mark.gpu
def test_modules_dispatch_and_switch_cuda(monkeypatch):
    """The norm modules and SelfAttention take the fused path on CUDA; WANVIDEO_FUSED=0 restores
    the torch path (same results within bf16 tolerance)."""
    torch.manual_seed(0)
    attn = model_mod.SelfAttention(DIM, HEADS, 1e-6).cuda().bfloat16()
    norm = model_mod.WanLayerNorm(DIM, 1e-6).cuda()
    affine = model_mod.WanLayerNorm(DIM, 1e-6, elementwise_affine=True).cuda()
    torch.nn.init.normal_(affine.weight, 1, 0.1)
    torch.nn.init.normal_(affine.bias, 0, 0.1)
    x, _, rot, resid, mod = _case(2, GRIDS[0], torch.bfloat16, "cuda")
    shift, scale = mod.chunk(6, dim=1)[:2]

    def outputs():
        with torch.no_grad():
            out, (q, k) = attn(x, rot, return_qk=True)
            return [out, q, k, norm.modulate(resid, shift, scale, torch.bfloat16),
                    affine(resid, torch.bfloat16), affine(resid)]

    calls = []
    for name in ("rms_norm_rope", "modulated_layer_norm", "layer_norm"):
        real = getattr(fused_ops, name)
        monkeypatch.setattr(fused_ops, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    fused = outputs()
    assert sorted(set(calls)) == ["layer_norm", "modulated_layer_norm", "rms_norm_rope"]
    monkeypatch.setenv("WANVIDEO_FUSED", "0")
    calls.clear()
    ref = outputs()
    assert calls == []
    for a, b in zip(fused, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=3e-2, atol=3e-2)


@pytest.mark.gpu
def test_tiny_i2v_bf16_fused_matches_unfused_cuda(monkeypatch):
    sd = random_state_dict(TINY_I2V, seed=3)
    model = ours(TINY_I2V, sd, torch.bfloat16, "cuda")
    x, t, ctx, clip, y = inputs(TINY_I2V, "cuda", frames=9, size=(16, 26))  # 3x8x13 tokens
    with torch.no_grad():
        monkeypatch.setenv("WANVIDEO_FUSED", "1")
        fused = model(x, t, ctx, clip, y).float()
        monkeypatch.setenv("WANVIDEO_FUSED", "0")
        ref = model(x, t, ctx, clip, y).float()
    assert torch.isfinite(fused).all()
    err = (fused - ref).abs().max().item()
    assert err <= 2e-2 * ref.abs().max().item(), err


def test_cpu_path_never_touches_triton(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("triton touched on the CPU path")

    monkeypatch.delenv("WANVIDEO_FUSED", raising=False)
    monkeypatch.setattr(fused_ops, "triton_available", boom)
    monkeypatch.setattr(fused_ops, "_rms_rope_kernel", boom)
    monkeypatch.setattr(fused_ops, "_layer_norm_kernel", boom)
    assert not fused_ops.enabled(torch.zeros(1))
    sd = random_state_dict(TINY_I2V, seed=3)
    model = ours(TINY_I2V, sd, torch.float32)
    args = inputs(TINY_I2V)
    with torch.no_grad():
        out = model(*args)
        monkeypatch.setenv("WANVIDEO_FUSED", "0")
        ref = model(*args)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_stream_starts_contiguous_fp32(dtype):
    """The fused norms read the fp32 residual as rows: patchify must hand it over contiguous
    (a transposed view made the first block copy it twice), whatever the compute dtype."""
    model = ours(TINY_I2V, random_state_dict(TINY_I2V, seed=3), dtype)
    x, _, _, _, y = inputs(TINY_I2V)
    with torch.no_grad():
        tokens, grid = model.patchify(x, y)
        conv = model.patch_embedding(torch.cat([x, y], dim=1).to(dtype))
    assert tokens.dtype == torch.float32 and tokens.is_contiguous()
    assert torch.equal(tokens, conv.flatten(2).transpose(1, 2).float())
    assert grid == tuple(conv.shape[2:])


def test_kernels_under_triton_interpreter():
    """The kernels' math on CPU tensors through TRITON_INTERPRET=1 (no GPU needed). In a fresh
    process: the interpreter must be chosen before triton is first imported."""
    triton_interpreter.run("import test_fused_ops as t\n"
                           "t._check_ops(2, t.GRIDS[0], torch.float32, 'cpu')\n"
                           "t._check_ops(1, (1, 3, 5), torch.bfloat16, 'cpu')\n"
                           "t._check_residual(2, t.GRIDS[0], 'cpu')\n"
                           "t._check_rows('cpu')\n")
