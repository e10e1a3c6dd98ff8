"""Flow-matching noise schedules (sigma = noise level in [0, 1], timestep = sigma * 1000).

Everything here is plain Python floats: a schedule is a short list that the step loop indexes,
so there is no reason to put it on a device (and a device tensor would force syncs when read).

Two constructions are provided, both taken from the official code:

* "infinitetalk" (the default, InfiniteTalk `generate_infinitetalk`, Euler loop):
  `timesteps = linspace(1000, 1, steps)`, shifted, then a final 0. In sigma units that is
  `linspace(1, 0.001, steps)` -> shift -> append 0. `steps` points plus the final 0, so the
  loop makes exactly `steps` model evaluations (per guidance pass).
* "wan_unipc" (Wan2.1's FlowUniPCMultistepScheduler.set_timesteps): `linspace(0.999, 0,
  steps + 1)[:-1]` -> shift -> append 0. Useful to reproduce the base Wan sampler.

shift(sigma) = s * sigma / (1 + (s - 1) * sigma); shift(0) = 0 and shift(1) = 1.
"""
from __future__ import annotations

NUM_TRAIN_TIMESTEPS = 1000
SCHEDULES = ("infinitetalk", "wan_unipc")


def shift_sigma(sigma: float, shift: float) -> float:
    """The resolution-dependent time shift used by Wan (larger shift = more time at high noise)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def _linspace(start: float, stop: float, num: int) -> list[float]:
    if num == 1:
        return [float(start)]
    step = (stop - start) / (num - 1)
    # Pin the end point exactly, like numpy does.
    return [start + i * step for i in range(num - 1)] + [float(stop)]


def flow_sigmas(steps: int, shift: float = 5.0, schedule: str = "infinitetalk") -> list[float]:
    """Shifted sigmas for `steps` model evaluations: a list of `steps + 1` floats ending in 0.0."""
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if schedule == "infinitetalk":
        base = _linspace(1.0, 1.0 / NUM_TRAIN_TIMESTEPS, steps)
    elif schedule == "wan_unipc":
        sigma_max = 1.0 - 1.0 / NUM_TRAIN_TIMESTEPS
        base = _linspace(sigma_max, 0.0, steps + 1)[:-1]
    else:
        raise ValueError(f"unknown schedule {schedule!r}; expected one of {SCHEDULES}")
    return [shift_sigma(s, float(shift)) for s in base] + [0.0]


def timesteps_from_sigmas(sigmas: list[float]) -> list[float]:
    """Model timesteps (0..1000 floats) for every step, i.e. all sigmas but the final one."""
    return [float(s) * NUM_TRAIN_TIMESTEPS for s in sigmas[:-1]]


def validate_sigmas(sigmas) -> list[float]:
    """Return the sigmas as a list of floats; they must decrease strictly and lie in [0, 1]."""
    values = [float(s) for s in sigmas]
    if len(values) < 2:
        raise ValueError("a schedule needs at least two sigmas (start and end)")
    for a, b in zip(values, values[1:]):
        if not a > b:
            raise ValueError(f"sigmas must decrease strictly, got {a} then {b}")
    if values[0] > 1.0 or values[-1] < 0.0:
        raise ValueError(f"sigmas must lie in [0, 1], got {values[0]} .. {values[-1]}")
    return values
