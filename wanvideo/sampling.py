"""The denoising loop for one window, independent of the model and of ComfyUI.

The caller supplies `model_fn(x, t, pass_spec) -> v`: it runs the transformer on latents x at
timestep t (a Python float in 0..1000) with the conditions that `pass_spec` names (positive or
negative text, real or zero audio; see guidance.PassSpec) and returns the velocity. The loop:

    for every step i:
        x[..., :M, :, :] = motion_latents            # clean, before every model call
        for each guidance pass:  check should_stop -> v_pass = model_fn(x, t_i, pass)
        v = guided combination of the passes
        preview(i, x0 estimate); x = solver.step(i, x, v); progress(i + 1, steps)
    x[..., :M, :, :] = motion_latents                # the result carries the clean frames too

Latents are [B, C, F, H, W] or [C, F, H, W]; the frame axis is -3. They are kept in float32
whatever the model's dtype (the official loop does the same). Noise comes from a CPU
torch.Generator, so a seed gives the same latents on every device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch

from .guidance import Guidance, PassSpec
from .schedules import timesteps_from_sigmas, validate_sigmas
from .solvers import Solver, make_solver

ModelFn = Callable[[torch.Tensor, float, PassSpec], torch.Tensor]
# run_passes(plan, run_pass, like) -> every pass's output in plan order (e.g.
# guidance_parallel.GuidanceParallel, which runs only this rank's passes and gathers the rest).
PassRunner = Callable[[Sequence[PassSpec], Callable[[PassSpec], torch.Tensor], torch.Tensor],
                      list]


class SamplingInterrupted(Exception):
    """Raised when `should_stop()` returns True before a model call."""

    def __init__(self, step: int, pass_name: str):
        super().__init__(f"sampling interrupted before step {step} ({pass_name} pass)")
        self.step = step
        self.pass_name = pass_name


@dataclass
class SamplingCallbacks:
    """Hooks for the front end; every one is optional.

    progress(steps_done, total_steps) after each step; preview(step, x0_estimate) before each
    solver update (x0_estimate has the latents' shape, float32); should_stop() before every
    model call (True -> SamplingInterrupted).
    """

    progress: Optional[Callable[[int, int], None]] = None
    preview: Optional[Callable[[int, torch.Tensor], None]] = None
    should_stop: Optional[Callable[[], bool]] = None


def make_noise(shape: Sequence[int], seed: int, device: Union[str, torch.device] = "cpu",
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise from a CPU generator (same values on every device), then moved."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(tuple(int(s) for s in shape), generator=gen, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def _write_motion(x: torch.Tensor, motion: Optional[torch.Tensor]) -> None:
    if motion is not None:
        x[..., : motion.shape[-3], :, :] = motion


def _check_motion(noise: torch.Tensor, motion: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if motion is None:
        return None
    if motion.ndim != noise.ndim or motion.shape[:-3] != noise.shape[:-3] \
            or motion.shape[-2:] != noise.shape[-2:] or motion.shape[-3] > noise.shape[-3]:
        raise ValueError(f"motion latents {tuple(motion.shape)} do not fit the latents "
                         f"{tuple(noise.shape)} (frame axis -3)")
    return motion.to(device=noise.device, dtype=torch.float32)


def _pass_runner(model_fn: ModelFn, x: torch.Tensor, t: float, step: int,
                 cb: SamplingCallbacks) -> Callable[[PassSpec], torch.Tensor]:
    def run_pass(spec: PassSpec) -> torch.Tensor:
        if cb.should_stop is not None and cb.should_stop():
            raise SamplingInterrupted(step, spec.name)
        v = model_fn(x, t, spec)
        if v.shape != x.shape:
            raise ValueError(f"model_fn returned {tuple(v.shape)} for latents {tuple(x.shape)}")
        return v.to(torch.float32)

    return run_pass


def sample_window(model_fn: ModelFn, noise: torch.Tensor, sigmas: Sequence[float],
                  solver: Union[str, Solver] = "euler", guidance: Optional[Guidance] = None,
                  motion_latents: Optional[torch.Tensor] = None,
                  callbacks: Optional[SamplingCallbacks] = None,
                  run_passes: Optional[PassRunner] = None) -> torch.Tensor:
    """Denoise `noise` along `sigmas` and return the final latents (float32, noise's shape).

    solver: a name for make_solver or a Solver built on the same sigmas (it is reset first).
    guidance: scales and pass plan; None means one conditional pass (scales 1, 1).
    motion_latents: clean latents for the first M frames, written before every model call.
    run_passes: who runs the guidance passes; None: all of them here, one after the other.
    """
    sigmas = validate_sigmas(sigmas)
    if isinstance(solver, str):
        solver = make_solver(solver, sigmas)
    elif len(solver.sigmas) != len(sigmas) or any(
            abs(a - b) > 1e-9 for a, b in zip(solver.sigmas, sigmas)):
        raise ValueError("the solver was built for different sigmas")
    solver.reset()
    guidance = guidance or Guidance(1.0, 1.0)
    plan = guidance.passes
    cb = callbacks or SamplingCallbacks()
    motion = _check_motion(noise, motion_latents)
    timesteps = timesteps_from_sigmas(sigmas)
    total = len(timesteps)

    x = noise.to(dtype=torch.float32).clone()
    for i, t in enumerate(timesteps):
        _write_motion(x, motion)
        run_pass = _pass_runner(model_fn, x, t, i, cb)
        if run_passes is None:
            outputs = [run_pass(spec) for spec in plan]
        else:
            outputs = run_passes(plan, run_pass, x)
        v = guidance.combine(outputs)
        del outputs
        if cb.preview is not None:
            cb.preview(i, solver.denoised(i, x, v))
        x = solver.step(i, x, v)
        if cb.progress is not None:
            cb.progress(i + 1, total)
    _write_motion(x, motion)
    return x
