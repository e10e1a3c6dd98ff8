import pytest
import torch

from wanvideo_infinitetalk.wanvideo import guidance as G


def _outs(names):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(2, 3, 4, generator=g) for n in names}


def test_three_pass_plan_and_formula():
    plan = G.plan_passes(5.0, 4.0)
    assert [p.name for p in plan] == ["cond", "no_text", "uncond"]
    assert (plan[0].negative_text, plan[0].audio) == (False, True)
    assert (plan[1].negative_text, plan[1].audio) == (True, True)
    assert (plan[2].negative_text, plan[2].audio) == (True, False)
    o = _outs(["cond", "no_text", "uncond"])
    got = G.combine([o[p.name] for p in plan], plan, 5.0, 4.0)
    want = o["uncond"] + 5.0 * (o["cond"] - o["no_text"]) + 4.0 * (o["no_text"] - o["uncond"])
    torch.testing.assert_close(got, want)


def test_two_pass_when_text_scale_is_one():
    plan = G.plan_passes(1.0, 4.0)
    assert [p.name for p in plan] == ["cond", "no_audio"]
    assert (plan[1].negative_text, plan[1].audio) == (False, False)
    o = _outs(["cond", "no_audio"])
    got = G.combine([o["cond"], o["no_audio"]], plan, 1.0, 4.0)
    torch.testing.assert_close(got, o["no_audio"] + 4.0 * (o["cond"] - o["no_audio"]))


def test_one_pass_when_both_are_one():
    plan = G.plan_passes(1.0, 1.0 + 1e-12)
    assert [p.name for p in plan] == ["cond"]
    o = _outs(["cond"])
    assert G.combine([o["cond"]], plan, 1.0, 1.0) is o["cond"]


def test_audio_scale_one_shortcut_equals_three_pass_formula():
    plan = G.plan_passes(5.0, 1.0)
    assert [p.name for p in plan] == ["cond", "no_text"]
    o = _outs(["cond", "no_text", "uncond"])
    full = o["uncond"] + 5.0 * (o["cond"] - o["no_text"]) + 1.0 * (o["no_text"] - o["uncond"])
    torch.testing.assert_close(G.combine([o["cond"], o["no_text"]], plan, 5.0, 1.0), full)


def test_guidance_object_and_errors():
    g = G.Guidance(5.0, 4.0)
    assert len(g.passes) == 3
    o = _outs(["a", "b", "c"])
    with pytest.raises(ValueError):
        g.combine([o["a"], o["b"]])
