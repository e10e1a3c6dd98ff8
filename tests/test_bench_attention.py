"""bench/attention.py's verdict (CPU): the classic speed-up (cuDNN timed first, then ours) and
the interleaved one (alternating rounds) are both judged against the issue's targets."""
from __future__ import annotations

import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(name: str = "attention"):
    """A module of bench/ (they import each other by bare names)."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def _entry(tokens, cudnn_ms, ours_ms, interleaved=None):
    ours = {"config": {"cuda": True}, "sweep_index": 31, "ms": ours_ms, "rel_l2": 0.0118,
            "cosine": 0.9999}
    entry = {"tokens": tokens, "cudnn_sdpa": {"ms": cudnn_ms}, "ours": [ours]}
    if interleaved is not None:
        entry["interleaved"] = {"rounds": 5, "cudnn_ms": cudnn_ms, "ours_ms": ours_ms,
                                "speedup": interleaved}
    return entry


def test_verdict_judges_both_speedups():
    bench = _bench()
    passed = bench.verdict(_entry(8100, 2.302, 1.763, interleaved=1.29))
    assert passed["speed_ok"] and passed["speedup_vs_cudnn"] > 1.3
    assert passed["interleaved_speedup"] == 1.29 and passed["interleaved_speed_ok"] is False
    steady = bench.verdict(_entry(32760, 37.5, 24.6, interleaved=1.52))
    assert steady["speed_ok"] and steady["interleaved_speed_ok"] and steady["accuracy_ok"]
    older = bench.verdict(_entry(32760, 37.5, 26.0))   # a run without the interleaved rounds
    assert not older["speed_ok"] and older["interleaved_speedup"] is None
    assert older["interleaved_speed_ok"] is None


def test_cuda_switches_patch_the_kernel_options_and_the_v_copy():
    """"int8@cuda:..." and bench/attention_variants.py: source options go into
    attention_int8_cuda.KERNEL_OPTIONS (on top of what it holds), v_direct into V_DIRECT; "+"
    separates like "," (window.py splits its backends at commas); a typo names the allowed keys;
    attention_spec restores every constant afterwards."""
    import pytest

    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda as ac

    common = _bench("common")
    patches = common.cuda_switches("pingpong=1+preset_lds=0,v_direct=1")
    assert (ac, "V_DIRECT", True) in patches
    assert (ac, "KERNEL_OPTIONS", {"pingpong": True, "preset_lds": False}) in patches
    for bad in ("pingpong=2", "bogus=1", "diag=1", "pingpong"):
        with pytest.raises(ValueError, match="expected key=0 or key=1"):
            common.cuda_switches(bad)
    before = (dict(ac.KERNEL_OPTIONS), ac.V_DIRECT)
    with common.attention_spec("int8@cuda:skip_ones=0+v_direct=1") as name:
        assert name == "int8" and ac.KERNEL_OPTIONS == {"skip_ones": False} and ac.V_DIRECT
    assert (dict(ac.KERNEL_OPTIONS), ac.V_DIRECT) == before


def test_forward_switches_set_and_restore_their_constants():
    """bench/forward_variants.py's switches: "@dynamic-tensorwise" / "@rows" set
    quant_linear.DYNAMIC_ROWS, "@rope-gather" the RMSNorm + RoPE kernel's older plan (a table
    lookup per channel pair, up to 16 warps); both restored after the with-block."""
    from wanvideo_infinitetalk.wanvideo import fused_ops, quant_linear

    common = _bench("common")
    assert quant_linear.DYNAMIC_ROWS and fused_ops._rope_plan(8192, 64) == (64, 8)
    assert fused_ops._rope_plan(8192, 48)[0] == 0   # head dim 96: the general path
    with common.attention_spec("sdpa@dynamic-tensorwise") as name:
        assert name == "sdpa" and not quant_linear.DYNAMIC_ROWS
    with common.attention_spec("int8@rope-gather") as name:
        assert name == "int8" and fused_ops._rope_plan(8192, 64) == (0, 16)
    assert quant_linear.DYNAMIC_ROWS and fused_ops._rope_plan(8192, 64) == (64, 8)
    with common.attention_spec("sdpa@rope-gather@dynamic-tensorwise") as name:   # combined
        assert name == "sdpa" and not quant_linear.DYNAMIC_ROWS
        assert fused_ops._rope_plan(8192, 64) == (0, 16)
    assert quant_linear.DYNAMIC_ROWS and fused_ops._rope_plan(8192, 64) == (64, 8)
    assert fused_ops._norm_warps(8192, True) == 4 and fused_ops._norm_warps(8192, False) == 8
    with common.attention_spec("sdpa@norm-warps16"):
        assert fused_ops._norm_warps(8192, True) == 16
    assert fused_ops._norm_warps(8192, True) == 4
