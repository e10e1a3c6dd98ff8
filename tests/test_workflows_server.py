"""The example workflows against a real ComfyUI: the tiny demo workflow end to end (MP4 with audio
of the right length), no memory growth over repeated runs, and the workflow templates listing.

The graph run here is example_workflows/api/infinitetalk_tiny_demo.json, the API twin that
scripts/make_workflows.py stored after converting the UI workflow in the real frontend;
tests/test_browser.py checks that the UI workflow still converts to exactly this graph and runs it
from the frontend's Run button. Interrupting mid-sampling is covered by tests/test_sampler_server.py.
"""
from __future__ import annotations

import copy
import json
import os
import time

import pytest

import comfy_harness as h
import demo_assets

pytestmark = pytest.mark.comfy

EXAMPLES = os.path.join(h.ROOT, "example_workflows")
NAMES = ("infinitetalk_single_speaker", "infinitetalk_two_speakers", "infinitetalk_dubbing",
         "infinitetalk_tiny_demo", "infinitetalk_two_gpus")
SAMPLER = "11"   # node ids in the tiny demo graph
SAVE = "13"
# A run must not leave memory behind: the server's RSS floor over runs 4-5 may exceed the floor
# over runs 2-3 by at most this much: a leak of more than 16 MB per run fails (two runs apart),
# e.g. keeping one 832x480 window's frames (130 MB) or this demo's whole video at full length.
RSS_TOLERANCE = 32 * 2**20


def tiny_graph(seed: int | None = None, max_frames: int | None = None) -> dict:
    with open(os.path.join(EXAMPLES, "api", "infinitetalk_tiny_demo.json"), encoding="utf-8") as f:
        g = copy.deepcopy(json.load(f))
    if seed is not None:
        g[SAMPLER]["inputs"]["seed"] = seed
    if max_frames is not None:
        g[SAMPLER]["inputs"]["max_frames"] = max_frames
    return g


@pytest.fixture
def demo(comfy, tiny_models):
    """The demo's portrait, speech and text embeds in the shared server's base directory
    (written once per session)."""
    if not hasattr(comfy, "demo_inputs"):
        comfy.demo_inputs = demo_assets.prepare_demo_inputs(comfy.base)
    return comfy.demo_inputs


def mp4_of(entry: dict, base: str) -> str:
    items = [i for i in h.ui_output(entry, SAVE).get("images", [])
             if str(i.get("filename", "")).endswith(".mp4")]
    assert len(items) == 1, entry.get("outputs")
    path = os.path.join(base, "output", items[0]["subfolder"], items[0]["filename"])
    assert os.path.isfile(path), path
    return path


def probe(path: str) -> dict:
    """Frames and rate of the video stream; duration and decoded length of the audio stream."""
    import av

    with av.open(path) as c:
        v = c.streams.video[0]
        out = {"rate": float(v.average_rate), "frames": sum(1 for _ in c.decode(video=0)),
               "size": (v.width, v.height), "audio_streams": len(c.streams.audio)}
    with av.open(path) as c:
        a = c.streams.audio[0]
        out["audio_stream_seconds"] = float(a.duration * a.time_base) if a.duration else None
        out["audio_decoded_seconds"] = sum(f.samples for f in c.decode(audio=0)) / a.sample_rate
    return out


def test_templates_list_the_example_workflows(comfy):
    templates = comfy.get("/api/workflow_templates")
    assert sorted(templates.get(h.PACK_NAME, [])) == sorted(NAMES), templates
    for name in NAMES:
        wf = comfy.get(f"/api/workflow_templates/{h.PACK_NAME}/{name}.json")
        assert wf["nodes"] and wf["links"]
        with open(os.path.join(EXAMPLES, f"{name}.json"), encoding="utf-8") as f:
            assert wf == json.load(f)


def test_tiny_workflow_writes_an_mp4_with_audio_of_the_speech_length(comfy, demo):
    t0 = time.monotonic()
    # A seed of its own: the browser test may have run the twin as it is (cached outputs there
    # would send no progress messages).
    entry = comfy.run(tiny_graph(seed=20261130), timeout=600)
    elapsed = time.monotonic() - t0
    seconds = demo_assets.wav_seconds(demo["speech"])
    st = probe(mp4_of(entry, comfy.base))
    assert st["frames"] == round(seconds * 25), (st, seconds)
    assert st["rate"] == 25.0 and st["size"] == (128, 128)
    assert st["audio_streams"] == 1
    video_seconds = st["frames"] / 25
    # AAC works in 1024-sample frames (46 ms at 22.05 kHz): allow one frame of padding
    assert abs(st["audio_stream_seconds"] - video_seconds) < 0.05, st
    assert abs(st["audio_decoded_seconds"] - video_seconds) < 0.05, st
    progress = [m["data"] for m in entry["events"]
                if m["type"] == "progress" and m["data"]["node"] == SAMPLER]
    assert progress and progress[-1]["value"] == progress[-1]["max"]
    print(f"tiny workflow: {st['frames']} frames, {seconds:.2f} s speech, run {elapsed:.1f} s")


def test_repeated_runs_do_not_grow_server_memory(comfy, demo):
    """Five runs with new seeds (the sampler and everything after it re-run; 57 frames = two
    windows). Single readings jump by ~100 MiB now and then and fall back on the next run
    (buffers not yet freed when the prompt reports success); a leak raises the floor instead, so
    the lower of runs 4-5 may exceed the lower of runs 2-3 by at most RSS_TOLERANCE."""
    rss = []
    for seed in (101, 102, 103, 104, 105):
        entry = comfy.run(tiny_graph(seed, max_frames=57), timeout=600)
        probe(mp4_of(entry, comfy.base))
        rss.append(comfy.rss_bytes())
    growth = min(rss[3:]) - min(rss[1:3])
    print("RSS after each run (MiB):", [round(r / 2**20) for r in rss])
    assert growth <= RSS_TOLERANCE, (
        f"server RSS floor grew {growth / 2**20:.1f} MiB from runs 2-3 to runs 4-5 "
        f"({[round(r / 2**20) for r in rss]} MiB; tolerance {RSS_TOLERANCE / 2**20:.0f} MiB)")
