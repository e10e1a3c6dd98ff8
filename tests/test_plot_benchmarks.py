"""scripts/plot_benchmarks.py draws every plot from the results in bench/results/, and when several
e2e reports measure the same card it draws that card once, from the newest report."""
from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "plot_benchmarks.py")
PNGS = ("blockswap_tokens.png", "e2e_stages.png", "e2e_vram.png", "e2e_long_rss.png",
        "multigpu_speedup.png")


def _script():
    spec = importlib.util.spec_from_file_location("plot_benchmarks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_plot_from_the_results(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib import image

    run = subprocess.run([sys.executable, SCRIPT, "--out", str(tmp_path)], capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in PNGS:
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", name
        assert data[-8:-4] == b"IEND", name
        width, height = struct.unpack(">II", data[16:24])
        assert 400 < width < 1600 and 200 < height < 900, (name, width, height)  # dpi ~110
        assert image.imread(str(tmp_path / name)).shape[:2] == (height, width)
    assert sorted(os.listdir(tmp_path)) == sorted(PNGS)


def _card(gib, *runs, ok=True):
    return {"card_gib": gib, "runs": {r: {"ok": ok} for r in runs}, "trace": []}


def test_one_report_per_card_newest_first(tmp_path):
    plot = _script()
    reports = {  # name: (report, mtime)
        "e2e_old_12_16.json": ({"cards": [_card(12.0, "cold", "warm"), _card(16.0, "cold")]}, 300),
        "e2e_new_16.json": ({"plan": ["cold"], "cards": [_card(16.0, "cold")]}, 100),
        "e2e_new_12_failed.json": ({"plan": ["cold"], "cards": [_card(12.0, "cold", ok=False)]},
                                   400),
        "e2e_new_24_a.json": ({"plan": ["cold"], "cards": [_card(24.0, "cold")]}, 200),
        "e2e_new_24_b.json": ({"plan": ["cold"], "cards": [_card(24.0, "cold")]}, 250),
    }
    for name, (report, mtime) in reports.items():
        path = tmp_path / name
        path.write_text(json.dumps(report))
        os.utime(path, (mtime, mtime))
    cards = plot.e2e_cards(str(tmp_path))
    # 12: the failed newer card does not count; 16: the current bench beats a later old file;
    # 24: same bench, the later file
    assert [(c["card_gib"], c["source"]) for c in cards] == [
        (12.0, "e2e_old_12_16.json"), (16.0, "e2e_new_16.json"), (24.0, "e2e_new_24_b.json")]
    assert plot.e2e_cards(str(tmp_path), want=plot._has_long) == []


def test_committed_results_draw_each_card_once():
    plot = _script()
    results = os.path.join(ROOT, "bench", "results")
    cards = plot.e2e_cards(results)
    gib = [c["card_gib"] for c in cards]
    assert gib and len(gib) == len(set(gib))
    for card in plot.e2e_cards(results, want=plot._has_long):
        assert len(card["runs"]["long"]["rss_per_window_gb"]) >= 2
    found = plot.multigpu_report(results)
    if found:
        for case in found[1]["cases"].values():
            two, speedup, _ = plot._two_gpu(case)
            assert two > 0 and speedup == pytest.approx(case["one_gpu_step_s"] / two, rel=0.01)
