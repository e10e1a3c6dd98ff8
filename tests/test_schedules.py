import math

import numpy as np
import pytest

from wanvideo_infinitetalk.wanvideo import schedules


@pytest.mark.parametrize("steps,shift", [(40, 7.0), (40, 11.0), (4, 5.0), (1, 3.0)])
def test_infinitetalk_sigmas_follow_the_formula(steps, shift):
    sig = schedules.flow_sigmas(steps, shift)
    base = np.linspace(1.0, 0.001, steps)
    expected = list(shift * base / (1 + (shift - 1) * base)) + [0.0]
    assert len(sig) == steps + 1
    assert sig[0] == pytest.approx(1.0)
    assert sig[-1] == 0.0
    np.testing.assert_allclose(sig, expected, rtol=0, atol=1e-12)


def test_matches_official_timestep_construction():
    # Official: timesteps = linspace(1000, 1, steps) (float32) + [0], then timestep_transform.
    steps, shift = 40, 7.0
    t = list(np.linspace(1000, 1, steps, dtype=np.float32)) + [0.0]
    t = [shift * (x / 1000) / (1 + (shift - 1) * (x / 1000)) * 1000 for x in t]
    sig = schedules.flow_sigmas(steps, shift)
    np.testing.assert_allclose(schedules.timesteps_from_sigmas(sig), t[:-1], rtol=1e-6)
    assert all(isinstance(x, float) for x in sig)


def test_wan_unipc_schedule():
    steps, shift = 10, 5.0
    base = np.linspace(0.999, 0.0, steps + 1)[:-1]
    expected = list(shift * base / (1 + (shift - 1) * base)) + [0.0]
    np.testing.assert_allclose(schedules.flow_sigmas(steps, shift, "wan_unipc"), expected, atol=1e-12)


def test_shift_one_is_identity_and_errors():
    np.testing.assert_allclose(schedules.flow_sigmas(5, 1.0)[:-1], np.linspace(1, 0.001, 5), atol=1e-12)
    with pytest.raises(ValueError):
        schedules.flow_sigmas(0, 5.0)
    with pytest.raises(ValueError):
        schedules.flow_sigmas(5, 5.0, "karras")
    with pytest.raises(ValueError):
        schedules.validate_sigmas([1.0, 0.5, 0.5, 0.0])
    assert math.isclose(schedules.shift_sigma(0.5, 3.0), 0.75)
