"""bench/sp_profile.py keeps working: its CPU smoke mode (2 gloo ranks, a tiny fp32 model) runs
both phases, profiles them by category and splits the forward exactly."""
from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CATEGORIES = {"nccl", "attention", "gemm", "copy", "triton", "other"}


def test_sp_profile_cpu_smoke(tmp_path):
    out = tmp_path / "sp_profile.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sp_profile.py"),
                          "--device", "cpu", "--blocks", "2", "--dim", "256", "--ffn", "512",
                          "--frames", "9", "--size", "64x64", "--quant", "none", "--dtype", "fp32",
                          "--warmup", "1", "--iters", "2", "--top", "10", "--pieces", "1",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["world"] == 2 and result["tokens"] == 3 * 4 * 4
    for phase in ("single", "split"):
        r = result[phase]
        assert r["ms_per_forward"] > 0 and 0 < r["ms_per_block"] <= r["forward_ms_per_block"]
        prof = r["profile"]
        assert set(prof["categories_ms"]) == CATEGORIES
        assert prof["categories_ms"]["gemm"] > 0 and prof["categories_ms"]["attention"] > 0
        assert 0 < len(prof["top"]) <= 10 and prof["events"] > 0
    # only the split forward communicates (all_to_all, all_gather)
    assert result["single"]["profile"]["category_counts"]["nccl"] == 0
    assert result["split"]["profile"]["category_counts"]["nccl"] > 0
    assert result["split"]["pieces"] == 1   # 2 heads over 2 ranks: one head each
    assert [r["rank"] for r in result["split_ranks"]] == [0, 1]
    assert set(result["overhead"]["by_category_ms_per_block"]) == CATEGORIES
    assert result["by_pieces"]["1"]["ms_per_forward"] > 0
    # fp32 on both sides: the split forward equals the single-process one
    assert result["correctness"]["rel_max"] <= 1e-5 and result["correctness"]["rel_l2"] <= 1e-5
