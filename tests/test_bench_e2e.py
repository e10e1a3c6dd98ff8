"""bench/e2e.py and scripts/plot_benchmarks.py keep working: the end-to-end bench runs its CPU smoke
mode (tiny models, a real ComfyUI server) and its report has the figures the docs quote."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.path.join(ROOT, ".cache", "ComfyUI", "main.py")


@pytest.mark.comfy
@pytest.mark.skipif(not os.path.exists(COMFY), reason="needs the ComfyUI checkout (make test)")
def test_e2e_bench_smoke_run(tmp_path):
    out = tmp_path / "e2e.json"
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "e2e.py"), "--tiny",
                          "--cards", "0", "--seconds", "2", "--work", str(tmp_path / "work"),
                          "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    card = json.loads(out.read_text())["cards"][0]
    cold, warm = card["runs"]["cold"], card["runs"]["warm"]
    assert cold["ok"] and warm["ok"], (cold.get("error"), warm.get("error"))
    # every executed node timed in order; the warm run re-executes only what changed
    classes = [s["class"] for s in cold["stages"]]
    assert "WanVideoModelLoader" in classes and classes[-1] == "SaveVideo"
    assert "WanVideoModelLoader" not in [s["class"] for s in warm["stages"]]
    assert all(s["wall_s"] >= 0 and s["peak_rss_gb"] > 0.1 for s in cold["stages"])
    # the MP4 was opened: 2 s at 25 fps, with its audio
    assert cold["video"]["frames"] == 50 and abs(cold["video"]["audio_s"] - 2.0) < 0.1
    assert len(cold["windows"]) == 2 and len(cold["step_times_s"]) > 0
    assert card["official_estimate"]["windows"] == 2
    assert card["trace"] and card["load"]["WanVideoModelLoader"]["wall_s"] >= 0


def test_plots_from_the_committed_results(tmp_path):
    pytest.importorskip("matplotlib")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_benchmarks.py"),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ("e2e_stages.png", "e2e_vram.png", "blockswap_tokens.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
