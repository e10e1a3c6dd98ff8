import pytest

from wanvideo_infinitetalk.multitalk import long_video as lv


def _stitch(plan):
    """Fake decode: every window yields its absolute frame numbers; stitch the kept parts."""
    video = []
    for w in plan.windows:
        decoded = list(range(w.audio_start, w.audio_end))
        assert len(decoded) == plan.clip
        video += decoded[w.keep_start:w.keep_end]
    return video


def _official_loop(n, clip=81, motion=9, max_frames=10**9):
    """The official generate loop's control flow (streaming mode), audio of n > clip frames."""
    starts, start, end, last, is_first = [], 0, clip, False, True
    lengths = []
    while True:
        starts.append(start)
        lengths.append(clip if is_first else clip - motion)
        if last:
            break
        is_first = False
        start += clip - motion
        end = start + clip
        if end >= min(max_frames, n):
            last = True
        if max_frames <= clip:
            break
    return starts, min(sum(lengths), max_frames, n)


@pytest.mark.parametrize("seconds,windows", [(0.5, 1), (1.0, 1), (3.24, 1), (10.0, 4), (61.0, 22)])
def test_windows_for_audio_lengths(seconds, windows):
    n = lv.frames_for_seconds(seconds)
    assert n == round(seconds * 25)
    plan = lv.plan_long_video(n)
    assert plan.num_windows == windows
    assert all(w.frames == 81 for w in plan.windows)
    assert [w.audio_start for w in plan.windows] == [72 * k for k in range(windows)]
    assert plan.total_frames == n
    assert _stitch(plan) == list(range(n))           # stitched length == N, frames in order
    assert plan.windows[-1].out_end == n
    first, rest = plan.windows[0], plan.windows[1:]
    assert (first.motion_frames, first.motion_latent_frames, first.keep_start) == (1, 1, 0)
    assert all((w.motion_frames, w.motion_latent_frames, w.keep_start) == (9, 3, 9) for w in rest)
    # Audio covers every window; kept frames read their own (unpadded) audio rows.
    assert plan.padded_audio_frames >= plan.windows[-1].audio_end
    for w in plan.windows:
        rows = plan.window_audio_indices(w)
        assert len(rows) == 81 and all(len(r) == 5 for r in rows)
        for f in range(w.keep_start, w.keep_end):
            assert rows[f][2] == w.audio_start + f
        assert all(0 <= i < n for r in rows for i in r)


def test_specific_numbers_ten_seconds():
    plan = lv.plan_long_video(250)
    w = plan.windows
    assert [(x.audio_start, x.audio_end) for x in w] == [(0, 81), (72, 153), (144, 225), (216, 297)]
    assert [(x.keep_start, x.keep_end) for x in w] == [(0, 81), (9, 81), (9, 81), (9, 34)]
    assert plan.padded_audio_frames == 297 + 3      # official: miss = end - len + 3
    idx = plan.padded_indices()
    assert idx[:250] == list(range(250))
    assert idx[250:] == list(range(249, 249 - 50, -1))  # mirrored tail, edge row repeated


@pytest.mark.parametrize("n", list(range(82, 700, 7)) + [153, 154, 225, 226])
def test_matches_official_control_flow(n):
    starts, length = _official_loop(n)
    plan = lv.plan_long_video(n)
    assert [w.audio_start for w in plan.windows] == starts
    assert plan.total_frames == length == len(_stitch(plan))


def test_no_padding_when_audio_reaches_past_last_window():
    plan = lv.plan_long_video(400, max_frames=150)
    assert plan.total_frames == 150 and plan.num_windows == 2
    assert plan.padded_audio_frames == 400
    assert _stitch(plan) == list(range(150))
    starts, length = _official_loop(400, max_frames=150)
    assert [w.audio_start for w in plan.windows] == starts and length == 150


def test_max_seconds_and_max_frames():
    plan = lv.plan_long_video(lv.frames_for_seconds(61), max_seconds=10)
    assert plan.total_frames == 250 and plan.num_windows == 4
    plan = lv.plan_long_video(1525, max_frames=300, max_seconds=20)
    assert plan.total_frames == 300
    with pytest.raises(ValueError):
        lv.plan_long_video(100, max_frames=0)


def test_short_audio_mirrors_and_trims():
    plan = lv.plan_long_video(12)
    assert plan.num_windows == 1 and plan.windows[0].frames == 81
    assert (plan.windows[0].keep_start, plan.windows[0].keep_end) == (0, 12)
    idx = plan.padded_indices()
    assert len(idx) == 84 and idx[:24] == list(range(12)) + list(range(11, -1, -1))
    fit = lv.plan_long_video(25, fit_short_clip=True)
    assert fit.clip == 25 and fit.windows[0].frames == 25 and _stitch(fit) == list(range(25))
    fit = lv.plan_long_video(12, fit_short_clip=True)
    assert fit.clip == 13 and (fit.clip - 1) % 4 == 0 and _stitch(fit) == list(range(12))


def test_custom_clip_and_errors():
    plan = lv.plan_long_video(200, clip=33, motion=5)
    assert plan.stride == 28 and all(w.frames == 33 for w in plan.windows)
    assert all(w.motion_latent_frames == 2 for w in plan.windows[1:])
    assert _stitch(plan) == list(range(200))
    for bad in [dict(clip=80), dict(clip=81, motion=0), dict(clip=81, motion=81)]:
        with pytest.raises(ValueError):
            lv.plan_long_video(100, **bad)
    with pytest.raises(ValueError):
        lv.plan_long_video(0)
    assert all(isinstance(v, int) for w in plan.windows for v in vars(w).values())
