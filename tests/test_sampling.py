import pytest
import torch

from wanvideo_infinitetalk.wanvideo import guidance as G
from wanvideo_infinitetalk.wanvideo import sampling, schedules, solvers


class Spy:
    """Fake model: records every call and returns a deterministic function of its inputs."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, spec):
        self.calls.append((x.clone(), t, spec))
        bias = {"cond": 0.3, "no_text": 0.1, "no_audio": -0.2, "uncond": -0.4}[spec.name]
        return (torch.tanh(x) * (t / 1000.0) + bias).to(torch.bfloat16)


SHAPE = (1, 16, 5, 4, 6)


def test_motion_latents_are_clean_in_every_call_and_in_the_result():
    sig = schedules.flow_sigmas(4, 7.0)
    noise = sampling.make_noise(SHAPE, seed=11)
    motion = torch.randn(1, 16, 3, 4, 6, generator=torch.Generator().manual_seed(5))
    spy = Spy()
    out = sampling.sample_window(spy, noise, sig, "unipc", G.Guidance(5.0, 4.0), motion)
    assert len(spy.calls) == 4 * 3
    assert [c[2].name for c in spy.calls[:3]] == ["cond", "no_text", "uncond"]
    assert [c[1] for c in spy.calls[::3]] == pytest.approx([s * 1000 for s in sig[:-1]])
    for x, _, _ in spy.calls:
        assert x.dtype == torch.float32 and x.shape == SHAPE
        assert torch.equal(x[:, :, :3], motion)
    assert torch.equal(out[:, :, :3], motion)
    assert not torch.equal(out[:, :, 3:], noise[:, :, 3:])
    # Passes within a step see the same latents.
    for k in range(0, len(spy.calls), 3):
        assert torch.equal(spy.calls[k][0], spy.calls[k + 1][0])
        assert torch.equal(spy.calls[k][0], spy.calls[k + 2][0])


def test_loop_equals_manual_euler_with_guidance():
    sig = schedules.flow_sigmas(3, 5.0)
    noise = sampling.make_noise(SHAPE, seed=3)
    spy = Spy()
    out = sampling.sample_window(spy, noise, sig, "euler", G.Guidance(1.0, 4.0))
    x = noise.clone()
    for i in range(3):
        cond = spy(x, sig[i] * 1000, G.COND).float()
        no_audio = spy(x, sig[i] * 1000, G.NO_AUDIO).float()
        v = no_audio + 4.0 * (cond - no_audio)
        x = x + v * (sig[i + 1] - sig[i])
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_determinism_for_a_seed():
    sig = schedules.flow_sigmas(3, 5.0)
    runs = [sampling.sample_window(Spy(), sampling.make_noise(SHAPE, seed=s), sig, "unipc")
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    assert torch.equal(sampling.make_noise((3, 4), 1), sampling.make_noise((3, 4), 1))


def test_interrupt_is_checked_before_every_model_call():
    sig = schedules.flow_sigmas(5, 5.0)
    spy = Spy()
    checks = []

    def should_stop():
        checks.append(len(spy.calls))
        return len(checks) == 5   # stop before the 5th model call: step 1, second pass

    with pytest.raises(sampling.SamplingInterrupted) as info:
        sampling.sample_window(spy, sampling.make_noise(SHAPE, 0), sig, "euler",
                               G.Guidance(5.0, 4.0),
                               callbacks=sampling.SamplingCallbacks(should_stop=should_stop))
    assert checks == [0, 1, 2, 3, 4] and len(spy.calls) == 4
    assert (info.value.step, info.value.pass_name) == (1, "no_text")


def test_progress_and_preview_callbacks():
    sig = schedules.flow_sigmas(4, 5.0)
    progress, previews = [], []
    noise = sampling.make_noise(SHAPE, 2)
    sampling.sample_window(Spy(), noise, sig, solvers.make_solver("euler", sig), None,
                           callbacks=sampling.SamplingCallbacks(
                               progress=lambda d, n: progress.append((d, n)),
                               preview=lambda i, x0: previews.append((i, x0.shape))))
    assert progress == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert previews == [(i, SHAPE) for i in range(4)]


def test_input_errors():
    sig = schedules.flow_sigmas(2, 5.0)
    noise = sampling.make_noise(SHAPE, 0)
    with pytest.raises(ValueError):
        sampling.sample_window(Spy(), noise, sig, motion_latents=torch.zeros(1, 16, 6, 4, 6))
    with pytest.raises(ValueError):
        sampling.sample_window(Spy(), noise, sig, solvers.make_solver("euler", schedules.flow_sigmas(3, 5.0)))
    with pytest.raises(ValueError):
        sampling.sample_window(lambda x, t, s: x[..., :2], noise, sig)
    # Unbatched latents [C, F, H, W] work the same way and the noise is not modified.
    before = noise[0].clone()
    out = sampling.sample_window(Spy(), noise[0], sig, motion_latents=torch.ones(16, 1, 4, 6))
    assert torch.equal(noise[0], before) and torch.equal(out[:, :1], torch.ones(16, 1, 4, 6))
