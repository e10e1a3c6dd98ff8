"""The WanVideo Multi-GPU node in a real ComfyUI over HTTP (CPU, tiny models, "cpu:2": two gloo
worker processes started by the pack inside the server).

The sampler with the node must give the frames the server gives without it; the workers stay
between prompts; Cancel stops them and they stay usable; a worker killed mid-prompt gives a
clear error, the server keeps serving and the next prompt starts new workers; ComfyUI freeing
its models stops them, and so does the server's exit."""
from __future__ import annotations

import json
import os
import signal
import time

import psutil
import pytest

import comfy_harness as h
import graph_nodes as gn
import mgpu_support as ms
from test_sampler_server import _prepare, _summary, graph

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.isfile(os.path.join(h.COMFY_DIR, "main.py")):
        pytest.skip("ComfyUI is not extracted: run `make setup`")
    base = str(tmp_path_factory.mktemp("multi_gpu_base"))
    _prepare(base)
    srv = h.ComfyServer(base).start()
    client = h.ComfyClient(srv)
    graph.real_audio = False
    try:
        assert srv.import_problems() == [], srv.log_text()[-4000:]
        yield client
    finally:
        client.close()
        pids = workers(client)
        srv.stop()
        # the workers notice their parent is gone (they poll it every 0.5 s)
        deadline = time.monotonic() + 10
        while ms.alive(pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not ms.alive(pids), "multi-GPU workers outlived the server"


def workers(server) -> list[int]:
    try:
        kids = psutil.Process(server.server.proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return sorted(p.pid for p in kids if "multi_gpu_worker" in " ".join(p.cmdline()))


def short(**kw) -> dict:
    """One window of 17 frames (the VAE decode of 81 frames dominates a CPU run)."""
    kw = {"clip": 17, "motion": 5, **kw}
    g = graph(**kw)
    g["8"]["inputs"]["max_frames"] = 17 if kw.get("audio") is None else 0
    return g


def multi(gpus="cpu:2", mode="auto", transport=None, **kw) -> dict:
    g = short(**kw)
    g["30"] = gn.multi_gpu(gpus, mode, transport)
    g["8"]["inputs"]["multi_gpu"] = ["30", 0]
    return g


def _close(a: dict, b: dict) -> bool:
    return abs(a["checksum"] - b["checksum"]) <= 1e-5 * abs(b["checksum"]) and \
        a["images"] == b["images"]


def test_two_workers_give_the_frames_of_one_process_and_stay(server):
    plain = _summary(server.run(short(seed=7), timeout=600))
    one = _summary(server.run(multi("cpu:1", seed=7), timeout=600))   # one device: as today
    assert one["checksum"] == plain["checksum"]
    assert "names one device" in server.log_text() and workers(server) == []
    entry = server.run(multi(seed=7), timeout=600)
    assert _close(_summary(entry), plain), (_summary(entry), plain)
    assert "WanVideo multi-GPU: 2 worker(s) on cpu, cpu (gloo) ready" in server.log_text()
    progress = [m["data"] for m in entry["events"] if m["type"] == "progress"
                and m["data"]["node"] == "8"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2   # 1 window x 2 steps
    pids = workers(server)
    assert len(pids) == 2
    guided = _summary(server.run(multi(mode="guidance", seed=8), timeout=600))
    assert guided["images"] == plain["images"] and workers(server) == pids   # model kept
    log = server.log_text()
    assert "this process's copy is released" in log
    # sampling here again: the released copy is loaded again from the file, same frames
    assert _summary(server.run(short(seed=7), timeout=600))["checksum"] == plain["checksum"]
    assert "into this process again" in server.log_text()


def _ensure_workers(server) -> list[int]:
    if len(workers(server)) != 2:
        server.run(multi(seed=9), timeout=600)
    return workers(server)


def test_cancel_stops_every_worker_and_they_stay_usable(server):
    pids = _ensure_workers(server)
    pid = server.queue(multi(audio="speech12s.wav", clip=17, motion=5, steps=50, seed=4))
    server.wait_progress(pid, "8")
    server.interrupt()
    entry = server.wait(pid, timeout=120)
    kinds = [m["type"] for m in entry["events"]]
    assert "execution_interrupted" in kinds and "execution_success" not in kinds, kinds
    assert workers(server) == pids
    assert _summary(server.run(multi(seed=5), timeout=600))["images"][0] == 17


def test_killed_worker_is_reported_and_the_next_prompt_starts_new_ones(server):
    old = _ensure_workers(server)
    pid = server.queue(multi(audio="speech12s.wav", clip=17, motion=5, steps=50, seed=6))
    server.wait_progress(pid, "8")
    os.kill(old[1], signal.SIGKILL)
    err = h.execution_error(server.wait(pid, timeout=120))
    assert err is not None and err["node_id"] == "8", err
    assert "was killed by SIGKILL" in err["exception_message"], err["exception_message"]
    assert "rank" in err["exception_message"] and "next run starts new ones" in \
        err["exception_message"]
    assert not ms.alive(old)
    assert _summary(server.run(multi(seed=5), timeout=600))["images"][0] == 17
    fresh = workers(server)
    assert len(fresh) == 2 and set(fresh).isdisjoint(old)


def test_freeing_comfyui_models_stops_the_workers(server):
    pids = _ensure_workers(server)
    status, _ = server._request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    deadline = time.monotonic() + 30
    while ms.alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not ms.alive(pids), server.log_text()[-2000:]


def test_copy_engines_where_they_cannot_run_fail_clearly_and_send_recv_runs(server):
    """CPU workers (gloo) have no copy engines: asking for them fails the prompt with the reason
    and the way out; the server keeps serving and send/recv gives the usual frames."""
    err = h.execution_error(server.wait(server.queue(multi(transport="copy_engine", seed=3)),
                                        timeout=300))
    assert err is not None and err["node_id"] == "8", err
    assert "'copy_engine' cannot run: the tensors are on cpu" in err["exception_message"], \
        err["exception_message"]
    assert _summary(server.run(multi(transport="send_recv", seed=3), timeout=600))["images"][0] \
        == 17


def test_bad_gpu_list_is_refused_clearly(server):
    err = h.execution_error(server.wait(server.queue(multi(gpus="7,9")), timeout=120))
    assert err is not None and err["node_id"] == "30", err
    assert "CUDA device" in err["exception_message"], err["exception_message"]
    json.dumps(err)


def test_schema_has_tooltips_and_the_sampler_takes_it(server):
    info = server.object_info()
    spec = info["WanVideoMultiGPU"]
    assert spec["category"] == "WanVideo InfiniteTalk"
    assert spec["output"] == ["WANVIDEOMULTIGPU"]
    inputs = spec["input"]["required"]
    assert list(inputs) == ["gpus", "mode"]
    assert inputs["mode"][0] == ["auto", "sequence", "guidance"] or \
        inputs["mode"][1].get("options") == ["auto", "sequence", "guidance"]
    transport = spec["input"]["optional"]["transport"]
    assert transport[0] == ["auto", "copy_engine", "send_recv"] or \
        transport[1].get("options") == ["auto", "copy_engine", "send_recv"]
    for name, decl in {**inputs, "transport": transport}.items():
        assert decl[1].get("tooltip"), name
    opt = info["WanVideoInfiniteTalkSampler"]["input"]["optional"]["multi_gpu"]
    assert opt[0] == "WANVIDEOMULTIGPU" and opt[1].get("tooltip")
