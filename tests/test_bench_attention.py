"""bench/attention.py's verdict (CPU): the classic speed-up (cuDNN timed first, then ours) and
the interleaved one (alternating rounds) are both judged against the issue's targets."""
from __future__ import annotations

import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module("attention")
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
