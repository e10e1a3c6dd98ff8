"""Helpers for the multi-GPU runtime tests (not a test module): the tiny model every worker
builds (tests/ is put on the workers' import path by ModelSpec.sys_path), the window jobs, the
single-process reference, and the check that no worker process is left behind."""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402,F401  (imports the pack as wanvideo_infinitetalk)
import torch  # noqa: E402

from sp_worker import EVEN, ODD, TINY_I2V_4_HEADS, inputs  # noqa: E402,F401
from test_pipeline import tiny_model  # noqa: E402
from wanvideo_infinitetalk.multitalk.multi_gpu import ModelSpec  # noqa: E402
from wanvideo_infinitetalk.multitalk.window_job import WindowJob, run_window  # noqa: E402
from wanvideo_infinitetalk.wanvideo.schedules import flow_sigmas  # noqa: E402

TESTS = os.path.dirname(os.path.abspath(__file__))
SPEC = ModelSpec.make("mgpu_support:tiny", sys_path=(TESTS,), seed=5)


def tiny(device, seed: int = 5):
    """The workers' factory: the same tiny I2V + InfiniteTalk model (4 heads) on every rank."""
    if torch.device(device).type != "cpu":
        raise ValueError("the tiny test model is built on the CPU")
    return tiny_model(TINY_I2V_4_HEADS, seed=seed)


def job(latent=ODD, speakers: int = 1, steps: int = 2, text: float = 5.0, audio: float = 4.0,
        seed: int = 11) -> WindowJob:
    case = inputs(latent, speakers, seed=seed)
    f = latent[0]
    motion = case["y"][:, 4:, :1].clone()
    audio_in = case["audio"]
    # inputs() builds 4*(f-1)+1 video frames of features for the model's latent frames
    return WindowJob(case["x"], flow_sigmas(steps, 7.0), "euler", text, audio, motion,
                     case["y"], case["clip_fea"], case["pos"], case["neg"], audio_in,
                     f"test window {latent}x{speakers}")


def reference(model, j: WindowJob) -> torch.Tensor:
    return run_window(model, j, torch.device("cpu"))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def children() -> list:
    """Live multi-GPU worker processes (and torchrun launchers) below this test process; other
    children (a session-wide ComfyUI server) are not ours to count."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(p.cmdline())
            if p.status() != psutil.STATUS_ZOMBIE and (
                    "multi_gpu_worker" in cmd or "torch.distributed.run" in cmd):
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def alive(pids) -> list:
    """Those of `pids` that are still running (not zombies)."""
    import psutil

    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out
