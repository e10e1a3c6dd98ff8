"""The 8-bit attention backend (wanvideo/attention_int8.py): its torch reference against fp32 on
CPU, the Triton kernel under Triton's interpreter on CPU (tiny shapes, a subprocess because
TRITON_INTERPRET must be set before triton is imported), the backend plumbing (auto / int8 /
fallbacks / loader option), and on sm_89+ GPUs the kernel against the reference (tight) and
against fp32 attention (the issue's targets). Run with -s to see the measured errors."""
import functools
import json
import logging
import os
import subprocess
import sys
import textwrap
import types

import pytest

import torch
import torch.nn.functional as F

from wanvideo_infinitetalk.wanvideo import attention as attn
from wanvideo_infinitetalk.wanvideo import attention_8bit as a8
from wanvideo_infinitetalk.wanvideo import attention_int8 as ai

from test_attention_8bit import dit_like, errors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_L2_TARGET, COSINE_TARGET = 0.03, 0.999


def bl(t):
    """[B, H, L, D] (the reference's layout) <-> [B, L, H, D] (the kernel's)."""
    return t.transpose(1, 2)


def sdpa_fp32(q, k, v):
    """fp32 attention of [B, L, H, D] inputs."""
    return bl(F.scaled_dot_product_attention(*(bl(t).float() for t in (q, k, v))))


# ----------------------------------------------------------------------------- reference, CPU

@pytest.mark.parametrize("tokens,head_dim", [(4096, 128), (1000, 128), (4096, 64), (1000, 64)])
def test_reference_meets_targets_against_fp32(tokens, head_dim):
    """The kernel's numerics (INT8 P.V, 128-key blocks) meet the issue's targets where the fp8 P.V
    study misses them (tests/test_attention_8bit.py): measured 0.020 rel L2 / 0.9998 cosine."""
    q, k, v = dit_like(tokens, head_dim)
    rel, cos = errors(a8.kernel_reference(q, k, v), F.scaled_dot_product_attention(q, k, v))
    print(f"\nreference {tokens} tokens, head_dim {head_dim}: rel L2 {rel:.4f} cos {cos:.6f}")
    assert rel <= REL_L2_TARGET and cos >= COSINE_TARGET
    assert rel <= 0.022  # measured 0.020: a regression of the recipe shows before the target


@pytest.mark.parametrize("pv,block_n,bound", [("int8", 64, 0.020), ("bf16", 64, 0.013),
                                               ("bf16", 128, 0.013)])
def test_reference_variants_against_fp32(pv, block_n, bound):
    """The launch options that change the numerics: measured 0.0174 (INT8 P.V, 64-key blocks)
    and 0.011 (bf16 P.V: the INT8 Q.K^T alone) at 1,000 tokens, head dim 64."""
    q, k, v = dit_like(1000, 64)
    out = a8.kernel_reference(q, k, v, block_n=block_n, pv=pv)
    rel, cos = errors(out, F.scaled_dot_product_attention(q, k, v))
    assert rel <= bound and cos >= COSINE_TARGET


def test_reference_is_blind_to_a_shared_key_bias():
    """The K smoothing: adding a per-channel constant to every key leaves the output unchanged
    up to fp32 rounding of the mean (without smoothing the bias would set K's INT8 step)."""
    q, k, v = dit_like(2048, 128)
    shifted = k + 50 * torch.randn(1, 2, 1, 128, generator=torch.Generator().manual_seed(9))
    rel, _ = errors(a8.kernel_reference(q, shifted, v), a8.kernel_reference(q, k, v))
    assert rel <= 2e-3


def test_reference_partial_last_block_is_masked():
    """1000 keys (not a multiple of 64): appending 24 keys with a huge score changes the output,
    so the reference must be masking them by length, not by value."""
    q, k, v = dit_like(1000, 64, seed=3)
    out = a8.kernel_reference(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert errors(out, ref)[0] <= REL_L2_TARGET
    assert out.shape == q.shape


# ----------------------------------------------------------------------------- Triton interpreter

INTERPRETED = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.join(sys.argv[1], "wanvideo"))
    import _pack
    sys.path.pop(0)  # wanvideo/inspect.py would shadow the standard library's inspect
    _pack.load_pack()
    import numpy as np
    import torch
    from triton.runtime import interpreter
    from wanvideo_infinitetalk.wanvideo import attention_8bit as a8, attention_int8 as ai

    # Three places where Triton 3.8's interpreter is not the GPU: its fma rounds the product
    # first, its bf16 cast truncates, and its bf16 tl.dot multiplies the raw bit patterns.
    Builder, Handle = interpreter.InterpreterBuilder, interpreter.TensorHandle
    plain_dot, plain_trunc = Builder.create_dot, Builder.create_fp_trunc

    def fused_fma(self, x, y, z):
        exact = x.data.astype(np.float64) * y.data.astype(np.float64) + z.data
        return Handle(exact.astype(z.data.dtype), z.dtype.scalar)

    def bf16_values(h):
        return (h.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)

    def dot(self, a, b, d, *rest):
        if str(a.dtype.scalar) != "bf16":
            return plain_dot(self, a, b, d, *rest)
        out = np.matmul(bf16_values(a).astype(np.float64), bf16_values(b).astype(np.float64))
        return Handle((out + d.data).astype(d.data.dtype), d.dtype.scalar)

    def trunc(self, src, dst_type):
        if str(dst_type.scalar) != "bf16" or src.data.dtype != np.float32:
            return plain_trunc(self, src, dst_type)
        bits = src.data.view(np.uint32).astype(np.uint64)
        even = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16  # round to nearest even
        return Handle(even.astype(np.uint16), dst_type.scalar)

    Builder.create_fma, Builder.create_dot, Builder.create_fp_trunc = fused_fma, dot, trunc

    # And a bug of Triton <= 3.6's interpreter: a scalar tensor used as an index (the kernel's
    # `range(0, keys // BLOCK_N)`) goes through int() of a 1-element 1-D array, which NumPy 2.4+
    # refuses ("only 0-dimensional arrays can be converted"); 3.8 squeezes it first.
    plain_patch_tensor = interpreter._patch_lang_tensor

    def patch_tensor(tensor, *scope):  # Triton 3.0-3.2 take no scope and set attributes directly
        plain_patch_tensor(tensor, *scope)
        index = lambda self: int(self.handle.data.item())  # noqa: E731
        if scope:
            scope[0].set_attr(tensor, "__index__", index)
        else:
            tensor.__index__ = index

    interpreter._patch_lang_tensor = patch_tensor

    # And one of Triton < 3.6's: an int32 tl.sum stays in NumPy's int64, so it does not wrap as
    # on the GPU (the P row sum removes 128 x 0x4B400000 with int32 wraparound).
    plain_to_tensor = interpreter.ReduceOps.to_tensor

    def to_tensor(self, ret, dtype):
        if getattr(ret, "shape", ()):
            ret = ret.astype(interpreter._get_np_dtype(dtype))
        return plain_to_tensor(self, ret, dtype)

    interpreter.ReduceOps.to_tensor = to_tensor
    results = []
    # the last two fields: the loop options of attention_int8.LOOP_DEFAULTS that the case sets,
    # and a key ramp (later keys up to 6x larger, so row maxima keep growing across blocks, by
    # more than the lazy threshold now and then)
    cases = [(1, 200, 200, 2, 64, torch.float32, False, "int8", 128, {}, False),
             (2, 70, 130, 2, 128, torch.float32, True, "int8", 64, {}, False),
             (1, 130, 100, 1, 128, torch.float16, False, "int8", 128, {}, False),
             (1, 150, 200, 2, 64, torch.bfloat16, False, "int8", 128, {}, False),
             (1, 150, 200, 2, 64, torch.float32, True, "bf16", 64, {}, False),
             (1, 100, 300, 1, 128, torch.bfloat16, False, "bf16", 128, {}, False)]
    loop_cases = [(1, 40, 1000, 1, 64, torch.float32, False, "int8", 64, {}, True),
                  (1, 40, 1000, 1, 64, torch.float32, False, "int8", 64, {"lazy": True}, True),
                  (1, 40, 1000, 1, 64, torch.bfloat16, False, "int8", 64, {"lazy": True}, False),
                  (1, 70, 300, 1, 128, torch.bfloat16, False, "int8", 64, {"ws": True}, False),
                  (1, 70, 300, 1, 128, torch.bfloat16, False, "int8", 64, {"unroll": 2}, False),
                  (2, 70, 300, 2, 128, torch.bfloat16, True, "int8", 64, {"tma": True}, False),
                  (1, 40, 1000, 1, 64, torch.float32, False, "int8", 64,
                   {"tma": True, "lazy": True}, True),
                  (1, 70, 300, 1, 128, torch.float32, False, "int8", 64,
                   {"ws": True, "lazy": True}, True),
                  (1, 70, 300, 1, 128, torch.float32, False, "bf16", 64, {"ws": True}, True)]
    for *case, loop, _ in loop_cases:  # the installed Triton's tl.range must take the option
        if ai.unsupported(dict(ai.LOOP_DEFAULTS, **loop)) is None:
            cases.append((*case, loop, _))
    for b, lq, lk, h, d, dtype, strided, pv, block_n, loop, ramp in cases:
        g = torch.Generator().manual_seed(lq)
        q = torch.randn(b, lq, h, d, generator=g).to(dtype)
        if strided:  # k and v as views into one [B, L, 2, H, D] tensor, as the all-to-all gives
            kv = torch.randn(b, lk, 2, h, d, generator=g)
            kv[:, :, 0] += 6 * torch.randn(d, generator=g)
            k, v = kv.to(dtype)[:, :, 0], kv.to(dtype)[:, :, 1]
        else:
            k = torch.randn(b, lk, h, d, generator=g)
            if ramp:
                k = k * torch.linspace(1, 6, lk)[None, :, None, None]
            k = (k + 6 * torch.randn(d, generator=g)).to(dtype)
            v = torch.randn(b, lk, h, d, generator=g).to(dtype)
        out = ai.attention_int8(q, k, v, block_m=32, block_n=block_n, pv=pv, **loop)
        ref = a8.kernel_reference(*(t.transpose(1, 2) for t in (q, k, v)), block_n=block_n,
                                  pv=pv).transpose(1, 2)
        diff = (out.float() - ref.float())
        results.append({"case": [b, lq, lk, h, d, str(dtype), strided, pv, block_n, loop, ramp],
                        "rel": (diff.norm() / ref.float().norm()).item(),
                        "max_abs": diff.abs().max().item(),
                        "finite": bool(torch.isfinite(out).all())})
    print(json.dumps(results))
""")


def test_kernel_under_triton_interpreter_matches_reference():
    """The kernel's own code on CPU, both P.V variants: int8 tl.dot, the rounding trick, the
    masked last block, strided views, Lq != Lk, 64- and 128-key blocks. The int8 path agrees bit
    for bit in every dtype (measured: 0 or ~1e-8 rel L2, fp32 summation order); the bf16 path
    differs only by summation order inside the product. Checked with Triton 3.2, 3.6 and 3.8."""
    triton = pytest.importorskip("triton")
    if _triton_version(triton) < (3, 2):
        pytest.skip(f"Triton {triton.__version__}'s interpreter already differs in the K/V "
                    "quantization pass (other K scales, then NaN; not investigated); "
                    "test_kernels_compile_for_sm90 still compiles the kernels")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", INTERPRETED, ROOT], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    print("\n" + "\n".join(str(r) for r in results))
    for r in results:
        assert r["finite"], r
        assert r["rel"] <= 1e-6, r


GLUON_LAYOUTS = textwrap.dedent("""
    import json, os, sys
    os.environ["TRITON_INTERPRET"] = "1"
    sys.path.insert(0, os.path.join(sys.argv[1], "wanvideo"))
    import _pack
    sys.path.pop(0)
    _pack.load_pack()
    import torch
    from wanvideo_infinitetalk.wanvideo import attention_int8 as ai
    g = torch.Generator().manual_seed(0)
    k, v = (torch.randn(2, 300, 3, 64, generator=g).bfloat16() for _ in range(2))
    plain = ai.quantize_kv(k, v, 128, "int8")
    swizzled = ai.quantize_kv(k, v, 128, "int8", gluon=True)
    copied = ai.quantize_kv(k, v, 128, "bf16", gluon=True)
    cuda = ai.quantize_kv(k, v, 128, "bf16", cuda=True)
    ints = cuda[0].float().reshape(6, 3, 128, 64)
    norms = ints.square().sum(-1).sqrt().amax(-1) * cuda[1]   # [B*H, blocks]
    c = torch.arange(plain[2].shape[-1])
    order = (c & ~15) | (((c >> 3) & 1) << 1) | (((c >> 1) & 3) << 2) | (c & 1)
    moved = torch.empty_like(plain[2])
    moved[..., order] = plain[2]
    ref_v = torch.zeros(6, 384, 64, dtype=torch.bfloat16)
    ref_v[:, :300] = v.permute(0, 2, 1, 3).reshape(6, 300, 64)
    print(json.dumps({"k_same": bool(torch.equal(swizzled[0], plain[0])),
                      "v_swizzled": bool(torch.equal(swizzled[2], moved)),
                      "v_not_plain": not torch.equal(swizzled[2], plain[2]),
                      "bf16_copy": bool(torch.equal(copied[2], ref_v)),
                      "bf16_no_scales": copied[3] is None,
                      "cuda_v_t": bool(torch.equal(cuda[2], ref_v.transpose(1, 2))),
                      "key_bound": (cuda[3] - norms.amax(-1)).abs().max().item(),
                      "key_bound_size": cuda[3].abs().max().item()}))
""")


def test_gluon_operand_orders_under_triton_interpreter():
    """What the Gluon kernels read, made by the Triton K/V pass (CPU, interpreter): INT8 V^T
    with each 16-key group's keys in the order the P.V operand's registers hold P's columns
    (key 8i + 2t + e at 4t + 2i + e, the inverse of attention_int8_gluon._as_operand's
    reshape and permute), K unchanged; for bf16 P.V a zero-padded bf16 copy of V laid out
    like K; for the CUDA kernel V^T and the largest key norm per (batch, head). The kernels
    themselves need sm_90 (GPU tests: equal to the Triton kernel)."""
    triton = pytest.importorskip("triton")
    if _triton_version(triton) < (3, 2):
        pytest.skip(f"Triton {triton.__version__}'s interpreter differs in the K/V pass")
    done = subprocess.run([sys.executable, "-c", GLUON_LAYOUTS, ROOT], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    # the CUDA layout's key bound: each (batch, head)'s largest |int8 key row| * block scale
    bound_error, bound_size = facts.pop("key_bound"), facts.pop("key_bound_size")
    assert bound_size > 1 and bound_error <= 1e-5 * bound_size, (bound_error, bound_size)
    assert all(facts.values()), facts
    import torch as _torch
    cols = _torch.arange(128).reshape(8, 2, 4, 2).permute(0, 2, 1, 3).reshape(128)
    c = _torch.arange(128)
    order = (c & ~15) | (((c >> 3) & 1) << 1) | (((c >> 1) & 3) << 2) | (c & 1)
    assert _torch.equal(order[cols], c)  # the two relabellings undo each other


def test_gluon_configs_are_hopper_only():
    pytest.importorskip("triton")
    gluon = [c for c in ai.SWEEP if c["gluon"]]
    assert gluon and all("Hopper" in ai.unsupported(c, 89) for c in gluon)
    assert "Hopper" in ai.unsupported(gluon[0], 100)
    assert "warpgroup" in ai.unsupported(dict(gluon[0], block_m=128, num_warps=4), 90)
    assert "warpgroup" in ai.unsupported(dict(gluon[0], block_m=256, num_warps=16), 90)
    two_warpgroups = ai.unsupported(dict(gluon[0], block_m=128, num_warps=8), 90)
    assert two_warpgroups is None or "Gluon Hopper API" in two_warpgroups


def _triton_version(triton) -> tuple[int, int]:
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def test_kernels_compile_for_sm90():
    """Every configuration bench/attention.py sweeps (the defaults among them, the warp-specialized,
    lazy-rescale and unrolled loops too), both kernels, compiled ahead of time for sm_90 by the
    installed Triton, no GPU needed: a compile break such as Triton 3.6's int8 tl.dot
    accumulator rule shows here, not in the middle of a GPU sweep. A config whose tl.range
    option this Triton lacks is skipped as the bench skips it (and named); the configs of
    record must all build. ~2-4 min cold on 2 cores (21 configs), seconds from the cache."""
    pytest.importorskip("triton")
    kernels = ai._kernels()
    skipped = []
    for config in ai.SWEEP:
        reason = ai.unsupported(config)
        if reason:
            skipped.append((config, reason))
            continue
        quant, attention = kernels.aot_compile(90, config)
        assert attention.asm["cubin"] and quant.asm["cubin"], config
    if skipped:
        print("\nnot built by this Triton:\n" + "\n".join(map(str, skipped)))
    assert not [c for c, _ in skipped if c in ai.SWEEP[:8]]
    assert ai.default_config(torch.device("cpu"), 128) in ai.SWEEP
    assert all(set(c) == set(ai.CONFIG_KEYS) for c in ai.SWEEP)


def test_unsupported_loop_options_are_refused_with_a_reason():
    """The bench skips what the installed Triton cannot build; lazy with bf16 P.V is refused
    everywhere (bf16 P relative to a stale max rounds off the reference's numerics)."""
    pytest.importorskip("triton")
    kernels = ai._kernels()
    assert ai.unsupported(ai.SWEEP[1]) is None
    assert "pv='int8'" in ai.unsupported(dict(ai.SWEEP[6], lazy=True))
    assert "not combined" in (ai.unsupported(dict(ai.SWEEP[1], ws=True, unroll=2)) or
                              "not combined")  # or: this Triton lacks one of them
    if "warp_specialize" not in kernels.range_options():
        assert "warp_specialize" in ai.unsupported(dict(ai.SWEEP[1], ws=True))
    with pytest.raises(ValueError, match="unroll"):
        ai.launch_config(torch.zeros(1, 1, 1, 64), unroll=0)


# ----------------------------------------------------------------------------- plumbing, CPU

def test_backend_names():
    assert attn.BACKENDS[:3] == ("auto", "sdpa", "int8")
    assert attn.check_backend("auto") == "auto"
    with pytest.raises(ValueError, match="unknown"):
        attn.check_backend("int4")


def test_auto_on_cpu_is_sdpa_without_warning(caplog):
    q, k, v = (bl(t) for t in dit_like(1100, 64))
    assert attn.auto_choice(torch.device("cpu"), 100_000) == "sdpa"
    with caplog.at_level(logging.WARNING):
        out = attn.attention(q, k, v, "auto")
    assert torch.equal(out, attn.attention(q, k, v, "sdpa"))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_auto_survives_a_kernel_that_cannot_be_built(monkeypatch, caplog):
    """`auto` where the kernel was chosen but fails (a Triton that does not compile it): the call
    returns SDPA's result, one warning names the error, and the kernel is not tried again on
    that device. An explicit int8 raises the error instead."""
    calls = []

    def broken(q, k, v, **_):
        calls.append(1)
        raise RuntimeError("PTX .version 8.7 does not support .target sm_90a")

    monkeypatch.setattr(attn, "_int8_or_reason", lambda *a: None)
    monkeypatch.setattr(ai, "attention_int8", broken)
    monkeypatch.setattr(attn, "_INT8_FAILED", {})
    q, k, v = (bl(t) for t in dit_like(1100, 64))
    want = attn.attention(q, k, v, "sdpa")
    with caplog.at_level(logging.WARNING, logger=attn.__name__):
        first = attn.attention(q, k, v, "auto")
        second = attn.attention(q, k, v, "auto")
    assert torch.equal(first, want) and torch.equal(second, want)
    assert len(calls) == 1
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warned) == 1 and "does not support .target sm_90a" in warned[0]
    with pytest.raises(RuntimeError, match="sm_90a"):
        attn.attention(q, k, v, "int8")


def test_auto_does_not_hide_out_of_memory(monkeypatch):
    def oom(q, k, v, **_):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(attn, "_int8_or_reason", lambda *a: None)
    monkeypatch.setattr(ai, "attention_int8", oom)
    monkeypatch.setattr(attn, "_INT8_FAILED", {})
    q, k, v = (bl(t) for t in dit_like(1100, 64))
    with pytest.raises(torch.OutOfMemoryError):
        attn.attention(q, k, v, "auto")
    assert not attn._INT8_FAILED


def test_int8_on_cpu_falls_back_to_sdpa_and_warns_once(caplog):
    """Chosen behaviour: an explicit int8 on a device the kernel cannot run on computes SDPA (the
    model still works, e.g. a workflow moved to another machine) and says so once per device."""
    pytest.importorskip("triton")
    attn._say_once.cache_clear()
    q, k, v = (bl(t) for t in dit_like(1100, 64))
    with caplog.at_level(logging.WARNING, logger=attn.__name__):
        out = attn.attention(q, k, v, "int8")
        attn.attention(q, k, v, "int8")
    assert torch.equal(out, attn.attention(q, k, v, "sdpa"))
    warned = [r for r in caplog.records if "int8" in r.getMessage()]
    assert len(warned) == 1 and "cpu" in warned[0].getMessage()


@pytest.mark.parametrize("change,reason", [
    (lambda q, k, v: (q, k[:, :512], v[:, :512]), "keys"),
    (lambda q, k, v: (q[..., :48], k[..., :48], v[..., :48]), "head_dim"),
    (lambda q, k, v: (q, k.half(), v), "dtypes"),
    (lambda q, k, v: (q, k, v), "CUDA"),
])
def test_supported_names_what_it_does_not_cover(change, reason):
    q, k, v = change(*(bl(t) for t in dit_like(1100, 64)))
    assert reason in ai.supported(q, k, v)


def test_loader_accepts_the_new_options(tmp_path):
    """The model loader's `attention` option reaches every attention module; on CPU int8 runs
    SDPA, so the forward equals the sdpa model's."""
    from wanvideo_infinitetalk.wanvideo.loader import load_model
    from wanvideo_infinitetalk.wanvideo.safetensors_writer import write_safetensors
    from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict

    path = tmp_path / "tiny.safetensors"
    write_safetensors(str(path), random_state_dict(TINY_I2V))
    outs = {}
    for backend in ("sdpa", "int8", "auto"):
        model = load_model(str(path), base_dtype="fp32", attention=backend).model
        assert model.attention_backend == backend
        assert {m.backend for m in model.modules() if hasattr(m, "backend")} == {backend}
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            outs[backend] = model(torch.randn(1, 16, 2, 8, 8, generator=g), torch.tensor([500.0]),
                                  torch.randn(1, 8, 4096, generator=g),
                                  torch.randn(1, 257, 1280, generator=g),
                                  torch.randn(1, 20, 2, 8, 8, generator=g))
    assert torch.equal(outs["int8"], outs["sdpa"]) and torch.equal(outs["auto"], outs["sdpa"])


# ----------------------------------------------------------------------------- GPU

def _int8_capable():
    return torch.cuda.is_available() and ai.device_supported(torch.device("cuda")) is None


def gpu_test(fn):
    return pytest.mark.gpu(pytest.mark.skipif(not _int8_capable(),
                                              reason="needs CUDA sm_89+ and triton")(fn))


def cuda_kernel_out(q, k, v, stages=3, out=None, **options):
    """The CUDA kernel's output (q's dtype) for q, k, v through quantize_for, launched with
    `options` (attention_int8_cuda_source.source's), written into `out` when given (else a new
    tensor); skips where the kernel does not run. Every element written and finite."""
    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda as ac

    reason = ac.unsupported(q)
    if reason:
        pytest.skip(reason)
    k_int, k_scale, v_t, k_bound = ai.quantize_for(k, v, ai.HOPPER_CUDA)
    out = torch.full_like(q, float("nan")) if out is None else out
    ac.attention(q, k_int, k_scale, v_t, out, k.shape[1], ai.softmax_factor(q.shape[-1]), stages,
                 0, k_bound=k_bound, **options)
    torch.cuda.synchronize()
    assert torch.isfinite(out).all()
    return out


def cuda_inputs(b, lq, lk, heads, head_dim, dtype, seed=0):
    """DiT-like [B, L, H, D] inputs (the K bias and outlier channels of dit_like), different in
    every batch entry and head pair, so a kernel mixing them up shows."""
    parts = [[dit_like(max(lq, lk), head_dim, seed=seed + 100 * i + j) for j in range(heads // 2)]
             for i in range(b)]
    q, k, v = (torch.cat([torch.cat([p[n] for p in row], dim=1) for row in parts], dim=0)
               for n in range(3))
    return tuple(bl(t).to("cuda", dtype).contiguous()
                 for t in (q[:, :, :lq], k[:, :, :lk], v[:, :, :lk]))


# {} is the device's default (the Gluon kernel on Hopper); gluon=False pins the Triton kernel
CONFIGS = [{}, {"pv": "int8", "gluon": False}, {"pv": "int8", "block_n": 64, "gluon": False},
           {"pv": "bf16", "block_n": 64, "gluon": False},
           {"pv": "int8", "block_m": 128, "num_warps": 8, "gluon": False},
           {"gluon": True, "lazy": True}, {"gluon": True, "pv": "bf16", "num_stages": 2},
           {"gluon": True, "pv": "bf16", "block_m": 128, "num_warps": 8, "num_stages": 2},
           {"cuda": True}, {"cuda": True, "num_stages": 2}, {"cuda": True, "pv": "int8"}]


@functools.lru_cache(maxsize=None)  # a few MB each
def _reference(b, lq, lk, heads, head_dim, dtype, block_n, pv):
    """The CPU reference of cuda_inputs(...), shared by the launch configs with equal numerics."""
    q, k, v = (bl(t).cpu() for t in cuda_inputs(b, lq, lk, heads, head_dim, dtype))
    return bl(a8.kernel_reference(q, k, v, block_n=block_n, pv=pv)).float()


# every dtype with the default launch settings, bf16 with the others (each pair compiles once)
CASES = [(dtype, {}) for dtype in (torch.bfloat16, torch.float16, torch.float32)] + \
    [(torch.bfloat16, config) for config in CONFIGS[1:]]


@gpu_test
@pytest.mark.parametrize("dtype,config", CASES, ids=lambda c: str(c).replace("torch.", "")
                         if not isinstance(c, dict) else
                         ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("b,lq,lk,heads,head_dim", [
    (1, 1000, 1000, 4, 128), (2, 1500, 1300, 2, 64), (1, 4097, 4097, 2, 128), (1, 130, 2111, 6, 64)])
def test_kernel_matches_reference(b, lq, lk, heads, head_dim, dtype, config):
    q, k, v = cuda_inputs(b, lq, lk, heads, head_dim, dtype)
    full = ai.launch_config(q, **config)
    _skip_if_unsupported(full, q)
    kv = ai.quantize_for(k, v, full)
    out = ai.attend_quantized(q, kv, lk, full, out=torch.full_like(q, float("nan")))
    assert torch.isfinite(out).all()  # every element written over the NaN poison
    ref = _reference(b, lq, lk, heads, head_dim, dtype, full["block_n"], full["pv"])
    rel, _ = errors(out.float().cpu(), ref)
    print(f"\nkernel vs reference {b, lq, lk, heads, head_dim, dtype, config}: rel L2 {rel:.2e}")
    # Under the interpreter they agree bit for bit; on the GPU exp2 is an approximation a few ulp
    # off, which moves an integer of P now and then; bf16/fp16 outputs add their rounding.
    # H200: 8.0e-4 in fp32 (1,000 keys): exp2's few-ulp error moves integers of P. The CUDA
    # kernel's lazy maximum rounds P to bf16 at other offsets than the reference (bf16 noise,
    # 2.9e-3; tests/test_attention_cuda_lazy.py shows it as accurate against fp32).
    lazy_cuda = full.get("cuda") and full["pv"] == "bf16"
    assert rel <= (6e-3 if lazy_cuda else 2e-3)


def _skip_if_unsupported(config, q=None):
    major, minor = torch.cuda.get_device_capability()
    reason = ai.unsupported(config, 10 * major + minor)
    if not reason and config.get("cuda") and q is not None:
        from wanvideo_infinitetalk.wanvideo import attention_int8_cuda

        reason = attention_int8_cuda.unsupported(q)
    if reason:
        pytest.skip(reason)


@gpu_test
@pytest.mark.parametrize("pv,lazy", [("int8", True), ("int8", False), ("bf16", False)])
@pytest.mark.parametrize("block_n,stages", [(128, 2), (64, 3)])
@pytest.mark.parametrize("block_m", [64, 128])
@pytest.mark.parametrize("b,lq,lk,heads,head_dim", [(2, 1500, 1300, 2, 64), (1, 4097, 4097, 2, 128)])
def test_gluon_kernel_equals_triton_kernel(b, lq, lk, heads, head_dim, pv, lazy, block_m, block_n,
                                           stages):
    """The Gluon kernels compute the Triton kernel's integers and fp32 operations in the same
    order: equal outputs (H200: bit for bit with lazy INT8 and with bf16 P.V; non-lazy INT8 P.V
    1.4e-5 rel: the fp32 fold rounds differently, presumably one compiler fusing acc * alpha +
    term into an FMA where the other does not; not traced further)."""
    q, k, v = cuda_inputs(b, lq, lk, heads, head_dim, torch.bfloat16)
    gluon = dict(pv=pv, block_m=block_m, block_n=block_n, num_warps=block_m // 16,
                 num_stages=stages, lazy=lazy, gluon=True)
    _skip_if_unsupported(gluon)
    triton_config = dict(pv=pv, block_m=64, block_n=block_n, num_warps=4, num_stages=3,
                         lazy=lazy, gluon=False)
    ours = ai.attention_int8(q, k, v, **gluon).float()
    theirs = ai.attention_int8(q, k, v, **triton_config).float()
    assert torch.isfinite(ours).all()
    rel, _ = errors(ours.cpu(), theirs.cpu())
    print(f"\ngluon vs triton {pv} lazy={lazy} {block_m}/{block_n}/{stages}: rel L2 {rel:.2e}")
    assert rel <= (1e-5 if lazy or pv == "bf16" else 1e-4)


@gpu_test
@pytest.mark.parametrize("pv", ["int8", "bf16"])
@pytest.mark.parametrize("tokens,head_dim", [(8100, 128), (4096, 64), (1000, 128)])
def test_kernel_meets_targets_against_fp32(tokens, head_dim, pv):
    q, k, v = cuda_inputs(1, tokens, tokens, 8, head_dim, torch.bfloat16, seed=tokens)
    if pv == ai.launch_config(q)["pv"]:
        out = attn.attention(q, k, v, "int8")  # the backend as the model calls it
    else:
        out = ai.attention_int8(q, k, v, pv=pv, block_n=64, gluon=False)
    rel, cos = errors(out.float(), sdpa_fp32(q, k, v))
    print(f"\nkernel ({pv} P.V) vs fp32, {tokens} tokens, head_dim {head_dim}: rel L2 {rel:.4f} "
          f"cos {cos:.6f}")
    assert rel <= REL_L2_TARGET and cos >= COSINE_TARGET


def _misaligned(t, offset_elems):
    raw = torch.empty(t.numel() + 64, dtype=t.dtype, device=t.device)
    view = raw[offset_elems:offset_elems + t.numel()].view(t.shape)
    view.copy_(t)
    return view


@gpu_test
@pytest.mark.parametrize("offset", [1, 4])
def test_odd_alignment_goes_through_the_guard(offset):
    """Inputs at 2 and 8 bytes past a 16-byte boundary (the guard copies them: bit for bit the
    aligned result) and strided views of one stacked tensor (the all-to-all's layout)."""
    q, k, v = cuda_inputs(1, 2000, 2000, 4, 128, torch.bfloat16)
    expected = ai.attention_int8(q, k, v)
    moved = [_misaligned(t, offset) for t in (q, k, v)]
    assert all(t.data_ptr() % 16 != 0 for t in moved)
    assert torch.equal(attn.attention(*moved, "int8"), expected)
    qkv = torch.stack([q, k, v], dim=2)  # [B, L, 3, H, D], read in place (strides 3*H*D)
    viewed = attn.attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], "int8")
    # the torch K mean may sum a strided view in another order: a K integer may move by one
    assert errors(viewed.float(), expected.float())[0] <= 1e-3


@gpu_test
def test_short_keys_and_other_head_dims_run_sdpa():
    q, k, v = cuda_inputs(1, 2000, 2000, 4, 128, torch.bfloat16)
    for args in ((q, k[:, :512], v[:, :512]), (q[..., :96], k[..., :96], v[..., :96])):
        assert torch.equal(attn.attention(*args, "int8"), attn.attention(*args, "sdpa"))


@gpu_test
def test_auto_follows_the_measured_table():
    least = attn.AUTO_INT8_MIN_KEYS.get(tuple(torch.cuda.get_device_capability()))
    for keys in (2000, 17000):
        q, k, v = cuda_inputs(1, 1100, keys, 2, 128, torch.bfloat16)
        fast = least is not None and keys >= least
        expected = ai.attention_int8(q, k, v) if fast else attn.attention(q, k, v, "sdpa")
        assert torch.equal(attn.attention(q, k, v, "auto"), expected)


@gpu_test
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_second_gpu_launches_on_its_own_device():
    """Triton launches on the current device: the launcher must switch to the tensors' own."""
    q, k, v = cuda_inputs(1, 2000, 2000, 4, 128, torch.bfloat16)
    expected = ai.attention_int8(q, k, v)
    with torch.cuda.device(0):
        other = ai.attention_int8(*(t.to("cuda:1") for t in (q, k, v)))
    assert other.device == torch.device("cuda:1")
    assert torch.equal(other.cpu(), expected.cpu())



@gpu_test
@pytest.mark.parametrize("quantization", ["none", "fp8_e4m3fn_scaled"])
def test_model_forward_under_block_swap_and_fp8(tmp_path, monkeypatch, quantization):
    """The tiny I2V model (head dim 128) at 1,024 tokens with every block streamed by BlockSwap:
    the int8 backend really runs the kernel (self-attention) and the forward stays within the
    issue's whole-forward bound of the SDPA one (cosine >= 0.995)."""
    from wanvideo_infinitetalk.wanvideo.block_swap import BlockSwap
    from wanvideo_infinitetalk.wanvideo.loader import load_model
    from wanvideo_infinitetalk.wanvideo.safetensors_writer import write_safetensors
    from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict

    path = tmp_path / "tiny.safetensors"
    write_safetensors(str(path), random_state_dict(TINY_I2V))
    calls = []
    kernel = ai.attention_int8
    monkeypatch.setattr(ai, "attention_int8", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    outs = {}
    for backend in ("sdpa", "int8"):
        model = load_model(str(path), device="cuda", base_dtype="bf16", attention=backend,
                           quantization=quantization).model
        swap = BlockSwap(TINY_I2V.num_layers, "cuda", prefetch=1).attach(model)
        g = torch.Generator(device="cuda").manual_seed(0)
        with torch.no_grad():
            outs[backend] = model(torch.randn(1, 16, 4, 32, 32, device="cuda", generator=g),
                                  torch.tensor([500.0], device="cuda"),
                                  torch.randn(1, 8, 4096, device="cuda", generator=g),
                                  torch.randn(1, 257, 1280, device="cuda", generator=g),
                                  torch.randn(1, 20, 4, 32, 32, device="cuda", generator=g)).float()
        swap.detach(model)
        swap.release()
    assert len(calls) == TINY_I2V.num_layers  # self-attention only; cross-attention ran SDPA
    cos = F.cosine_similarity(outs["int8"].flatten(), outs["sdpa"].flatten(), dim=0).item()
    print(f"\nforward int8 vs sdpa ({quantization}, BlockSwap): cosine {cos:.6f}")
    assert cos >= 0.995


def test_hopper_default_is_cuda_then_gluon_then_triton(monkeypatch):
    """Hopper: the CUDA kernel for head dim 128 where NVRTC builds it, until it fails on a
    device; then (and for head dim 64, or cuda=False) the bf16 Gluon kernel; after that failed
    too, or with a Triton without Gluon, the Triton kernel; other GPUs keep theirs."""
    monkeypatch.setattr(ai, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(ai, "_cuda_ready", lambda: True)
    monkeypatch.setattr(ai, "_gluon_ready", lambda: True)
    monkeypatch.setattr(ai, "_CUDA_FAILED", {})
    monkeypatch.setattr(ai, "_GLUON_FAILED", {})
    gpu, other = torch.device("cuda", 0), torch.device("cuda", 1)
    assert ai.default_config(gpu, 128) == ai.HOPPER_CUDA == ai.SWEEP[31]
    assert ai.default_config(gpu, 64) == ai.HOPPER_GLUON
    assert ai.default_config(gpu, 128, cuda=False) == ai.HOPPER_GLUON
    ai._CUDA_FAILED[gpu] = "CudaRuntimeError: boom"
    assert ai.default_config(gpu, 128) == ai.HOPPER_GLUON == ai.SWEEP[26]
    assert ai.default_config(other, 128) == ai.HOPPER_CUDA
    monkeypatch.setattr(ai, "_cuda_ready", lambda: False)
    ai._GLUON_FAILED[gpu] = "RuntimeError: boom"
    fallback = ai.default_config(gpu, 128)
    assert fallback == ai.SWEEP[1] and not fallback["gluon"]
    assert ai.default_config(other, 128) == ai.HOPPER_GLUON   # only the failing device
    monkeypatch.setattr(ai, "_gluon_ready", lambda: False)
    assert ai.default_config(other, 128) == ai.SWEEP[1]
    monkeypatch.setattr(ai, "_capability", lambda device: (8, 9))
    assert ai.default_config(other, 128) == ai.SWEEP[2]


def test_a_failing_gluon_kernel_hands_over_to_the_triton_kernel(monkeypatch, caplog):
    failed = {}
    monkeypatch.setattr(ai, "_GLUON_FAILED", failed)
    monkeypatch.setattr(ai, "default_config", lambda device, head_dim, cuda=True: dict(
        ai.SWEEP[1] if device in failed else ai.HOPPER_GLUON))
    launched = []

    def launch(q, k, v, config):
        launched.append(config["gluon"])
        if config["gluon"]:
            raise RuntimeError("PTX .version 8.7 does not support .target sm_90a")
        return q + 1

    monkeypatch.setattr(ai, "_launch", launch)
    q = torch.zeros(1, 8, 2, 64)
    with caplog.at_level(logging.WARNING, logger=ai.__name__):
        first, second = ai.attention_int8(q, q, q), ai.attention_int8(q, q, q)
    assert torch.equal(first, q + 1) and torch.equal(second, q + 1)
    assert launched == [True, False, False]           # the Gluon kernel is not retried
    assert "sm_90a" in failed[q.device]
    warnings = [r.getMessage() for r in caplog.records if "Gluon kernel failed" in r.getMessage()]
    assert len(warnings) == 1 and "the Triton 8-bit kernel" in warnings[0]
    with pytest.raises(RuntimeError, match="sm_90a"):   # explicit settings get the error
        ai.attention_int8(q, q, q, gluon=True)

    def out_of_memory(q, k, v, config):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    failed.clear()
    monkeypatch.setattr(ai, "_launch", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        ai.attention_int8(q, q, q)
    assert not failed    # memory is not a reason to leave the Gluon kernel


def test_a_failing_cuda_kernel_hands_over_to_the_gluon_kernel(monkeypatch, caplog):
    """The CUDA default failing (no driver entry point, an NVRTC that cannot target sm_90a, a
    launch error) is recorded for its device and the Gluon kernel runs, that call and after."""
    monkeypatch.setattr(ai, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(ai, "_cuda_ready", lambda: True)
    monkeypatch.setattr(ai, "_gluon_ready", lambda: True)
    monkeypatch.setattr(ai, "_cuda_takes", lambda q: True)
    monkeypatch.setattr(ai, "_CUDA_FAILED", {})
    monkeypatch.setattr(ai, "_GLUON_FAILED", {})
    launched = []

    def launch(q, k, v, config):
        launched.append("cuda" if config["cuda"] else "gluon" if config["gluon"] else "triton")
        if config["cuda"]:
            raise RuntimeError("CUDA driver launch: error 700")
        return "out"

    monkeypatch.setattr(ai, "_launch", launch)
    q = types.SimpleNamespace(device=torch.device("cuda", 0), shape=(1, 8, 2, 128))
    with caplog.at_level(logging.WARNING, logger=ai.__name__):
        first, second = ai.attention_int8(q, q, q), ai.attention_int8(q, q, q)
    assert first == second == "out"
    assert launched == ["cuda", "gluon", "gluon"]
    assert "error 700" in ai._CUDA_FAILED[q.device]
    warnings = [r.getMessage() for r in caplog.records if "CUDA kernel failed" in r.getMessage()]
    assert len(warnings) == 1 and "the Gluon 8-bit kernel" in warnings[0]
    with pytest.raises(RuntimeError, match="error 700"):   # explicit settings get the error
        ai.attention_int8(q, q, q, cuda=True)


def test_calls_the_cuda_kernel_does_not_take_run_the_next_kernel(monkeypatch):
    """fp16 / fp32 inputs, head dim 64 and unaligned q go to the Gluon default; overrides start
    from it too (their keys describe the other kernels), cuda=True from the CUDA settings."""
    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda as ac

    monkeypatch.setattr(ai, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(ai, "_cuda_ready", lambda: True)
    monkeypatch.setattr(ai, "_gluon_ready", lambda: True)
    monkeypatch.setattr(ai, "_CUDA_FAILED", {})
    monkeypatch.setattr(ai, "_GLUON_FAILED", {})
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))

    class Fake:  # a CUDA tensor's metadata without a GPU
        def __init__(self, dtype=torch.bfloat16, head_dim=128, offset=0, stride_l=1024):
            self.device, self.dtype, self.shape = torch.device("cuda", 0), dtype, (1, 8, 8, head_dim)
            self._ptr, self._strides = 4096 + offset, (8 * stride_l, stride_l, head_dim, 1)

        def data_ptr(self):
            return self._ptr

        def stride(self, dim=None):
            return self._strides if dim is None else self._strides[dim]

    assert ac.unsupported(Fake()) is None
    assert ai.launch_config(Fake()) == ai.HOPPER_CUDA
    for fake, reason in ((Fake(torch.float16), "bf16"), (Fake(head_dim=64), "head dim"),
                         (Fake(offset=2), "aligned"), (Fake(stride_l=1028), "aligned")):
        assert reason in ac.unsupported(fake)
        assert ai.launch_config(fake) == ai.HOPPER_GLUON
    assert ai.launch_config(Fake(), num_stages=3) == dict(ai.HOPPER_GLUON, num_stages=3)
    assert ai.launch_config(Fake(), cuda=True, num_stages=2) == ai.SWEEP[32]


def test_the_loader_can_say_which_attention_runs(monkeypatch):
    cpu = torch.device("cpu")
    assert attn.describe_backend("sdpa", cpu) == "PyTorch SDPA"
    assert attn.describe_backend("int8", cpu).startswith("PyTorch SDPA (the 8-bit kernel needs")
    assert attn.describe_backend("flash_attn", cpu) == "the flash_attn package"
    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(ai, "device_supported", lambda device: None)
    monkeypatch.setattr(ai, "_capability", lambda device: (9, 0))
    monkeypatch.setattr(ai, "_gluon_ready", lambda: True)
    monkeypatch.setattr(ai, "_cuda_ready", lambda: True)
    monkeypatch.setattr(ai, "_GLUON_FAILED", {})
    monkeypatch.setattr(ai, "_CUDA_FAILED", {})
    monkeypatch.setattr(attn, "auto_min_keys", lambda device: 16384)
    assert attn.describe_backend("int8", gpu).startswith(
        "the CUDA 8-bit kernel (INT8 Q.K^T, bf16 P.V, 128x128 tiles, two consumer warpgroups")
    ai._CUDA_FAILED[gpu] = "CudaRuntimeError: boom"
    assert attn.describe_backend("int8", gpu).startswith(
        "the Gluon 8-bit kernel (INT8 Q.K^T, bf16 P.V, 64x128 tiles)")
    assert attn.describe_backend("auto", gpu).endswith("from 16,384 keys, PyTorch SDPA below")
    ai._GLUON_FAILED[gpu] = "RuntimeError: boom"
    assert "the Triton 8-bit kernel (INT8 Q.K^T, INT8 P.V" in attn.describe_backend("int8", gpu)
    monkeypatch.setattr(attn, "auto_min_keys", lambda device: None)
    assert "not measured faster" in attn.describe_backend("auto", gpu)


@gpu_test
def test_failing_gluon_kernel_hands_over_on_the_gpu(monkeypatch, caplog):
    """On a real GPU: the Gluon default breaking at launch gives the Triton kernel's output."""
    q, k, v = cuda_inputs(1, 1100, 1100, 2, 128, torch.bfloat16)
    monkeypatch.setattr(ai, "_CUDA_FAILED", {q.device: "this test: the Gluon kernel's turn"})
    if not ai.launch_config(q)["gluon"]:
        pytest.skip("the default kernel here is not the Gluon one")
    monkeypatch.setattr(ai, "_GLUON_FAILED", {})

    class Broken:
        @staticmethod
        def attention(*args, **kwargs):
            raise RuntimeError("simulated Gluon launch failure")

    monkeypatch.setattr(ai, "_gluon_kernels", lambda: Broken)
    with caplog.at_level(logging.WARNING, logger=ai.__name__):
        out = attn.attention(q, k, v, "int8")
    assert torch.equal(out, ai.attention_int8(q, k, v, **ai.SWEEP[1]))
    assert "simulated" in ai._GLUON_FAILED[q.device]
    assert "Triton 8-bit kernel" in attn.describe_backend("int8", q.device)
    monkeypatch.setattr(ai, "_GLUON_FAILED", {})
    print("\nauto on this GPU: " + attn.describe_backend("auto", q.device))


@gpu_test
def test_failing_cuda_kernel_hands_over_on_the_gpu(monkeypatch, caplog):
    """On a real GPU: the CUDA default breaking at launch gives the Gluon kernel's output."""
    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda

    q, k, v = cuda_inputs(1, 1100, 1100, 2, 128, torch.bfloat16)
    monkeypatch.setattr(ai, "_CUDA_FAILED", {})
    if not ai.launch_config(q)["cuda"]:
        pytest.skip("the default kernel here is not the CUDA one")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated CUDA launch failure")

    monkeypatch.setattr(attention_int8_cuda, "attention", broken)
    with caplog.at_level(logging.WARNING, logger=ai.__name__):
        out = attn.attention(q, k, v, "int8")
    assert torch.equal(out, ai.attention_int8(q, k, v, **ai.HOPPER_GLUON))
    assert "simulated" in ai._CUDA_FAILED[q.device]
    assert "Gluon 8-bit kernel" in attn.describe_backend("int8", q.device)


@gpu_test
@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("b,lq,lk,heads", [(2, 1500, 1300, 4), (1, 4097, 4097, 2),
                                           (1, 130, 2111, 2), (1, 8100, 8100, 2)])
def test_cuda_kernel_equals_the_gluon_kernel(b, lq, lk, heads, stages):
    """The CUDA kernel computes the Gluon bf16 kernel's integers; its row sums are those of the
    bf16 P (accumulated by the tensor cores) and its lazy maximum scales P by 2^-k per row and
    block before the bf16 rounding (tests/test_attention_cuda_lazy.py: the max-first variant
    within 1e-3, this one as accurate against fp32).
    q is read in place from a packed [B, L, H, 3 * 128] tensor (the projections' layout)."""
    q, k, v = cuda_inputs(b, lq, lk, heads, 128, torch.bfloat16)
    packed = torch.zeros(b, lq, heads, 3 * 128, dtype=q.dtype, device=q.device)
    packed[..., 128:256] = q
    q_view = packed[..., 128:256]
    config = dict(ai.SWEEP[31], num_stages=stages)
    _skip_if_unsupported(config, q_view)
    ours = ai.attention_int8(q_view, k, v, **config).float()
    theirs = ai.attention_int8(q, k, v, **ai.HOPPER_GLUON).float()
    assert torch.isfinite(ours).all()
    rel, _ = errors(ours.cpu(), theirs.cpu())
    print(f"\ncuda vs gluon {b, lq, lk, heads} stages {stages}: rel L2 {rel:.2e}")
    # max-first (eighth session): H200, 8,100 and 32,760 tokens x 40 heads, 3.6e-4 / 4.1e-4 from
    # the row sums of the bf16 P; the lazy maximum rounds P to bf16 at other offsets: 2.9e-3
    assert rel <= 6e-3
