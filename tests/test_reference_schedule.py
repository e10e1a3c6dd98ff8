"""Dubbing schedule: which source frame conditions each window, the frames each window adds and
the output length, against the official InfiniteTalk loop (simulated independently below), with
the cases listed; other frame rates map by time; past-the-end modes."""
from __future__ import annotations

import pytest

from wanvideo_infinitetalk.multitalk.long_video import plan_long_video
from wanvideo_infinitetalk.multitalk.reference_schedule import (added_frames, reference_schedule,
                                                                source_index)

SOURCES = (1, 40, 100, 250, 375, 2000)
AUDIO_SECONDS = (2, 3.24, 3.28, 10, 10.68, 80)


def official(audio_frames: int, source_frames: int, clip: int = 81, motion: int = 9):
    """The official generate loop, step by step: window k starts at audio_start_idx (advanced by
    clip - motion after each window), its reference is source frame audio_start_idx or the last
    frame past the end, the loop ends one window after audio_end_idx >= the audio length, the
    first window keeps all its frames and later ones drop their motion frames, the video is
    trimmed to the audio. (The official code refuses audio of `clip` frames or fewer; for those
    the same rule gives the one window we make.)"""
    start, refs, adds, arrive = 0, [], [], False
    while True:
        refs.append(start if start < source_frames else source_frames - 1)
        keep_from = 0 if start == 0 else motion
        adds.append((start + keep_from, min(start + clip, audio_frames)))
        if arrive or start + clip >= audio_frames:
            break
        start += clip - motion
        arrive = start + clip >= audio_frames
    return refs, adds, audio_frames


LISTED = {   # (source frames, audio seconds) -> (reference frames, frames each window adds)
    (1, 10): ([0, 0, 0, 0], [(0, 81), (81, 153), (153, 225), (225, 250)]),
    (40, 3.28): ([0, 39], [(0, 81), (81, 82)]),
    (100, 10.68): ([0, 72, 99, 99], [(0, 81), (81, 153), (153, 225), (225, 267)]),
    (250, 10): ([0, 72, 144, 216], [(0, 81), (81, 153), (153, 225), (225, 250)]),
    (375, 2): ([0], [(0, 50)]),
    (2000, 3.24): ([0], [(0, 81)]),
}


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("seconds", AUDIO_SECONDS)
def test_schedule_follows_the_official_loop_for_a_25fps_source(source, seconds):
    frames = int(round(seconds * 25))
    plan = plan_long_video(frames)
    schedule = reference_schedule(plan, source, 25.0)
    refs, adds, length = official(frames, source)
    assert list(schedule.frames) == refs
    assert list(added_frames(plan)) == adds
    assert plan.total_frames == length
    if (source, seconds) in LISTED:
        assert (list(schedule.frames), list(added_frames(plan))) == LISTED[(source, seconds)]


def test_80_seconds_of_2000_frames_listed():
    plan = plan_long_video(2000)
    schedule = reference_schedule(plan, 2000, 25.0)
    assert plan.num_windows == 28 and plan.total_frames == 2000
    assert list(schedule.frames) == [72 * k for k in range(28)]
    assert list(added_frames(plan))[-1] == (72 * 27 + 9, 2000)


@pytest.mark.parametrize("fps, expected", [
    (24.0, [0, 69, 138, 207]),      # floor(72k * 24 / 25)
    (30.0, [0, 86, 172, 259]),      # floor(72k * 30 / 25): 86.4k
    (60.0, [0, 172, 345, 518]),     # 172.8k
])
def test_other_frame_rates_map_by_time(fps, expected):
    plan = plan_long_video(250)
    assert list(reference_schedule(plan, 10_000, fps).frames) == expected


@pytest.mark.parametrize("mode, expected", [
    ("freeze", [0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4]),
    ("loop", [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0]),
    ("pingpong", [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2]),
])
def test_past_the_end_modes(mode, expected):
    assert [source_index(t, 5, 25.0, mode) for t in range(11)] == expected


def test_single_frame_source_and_bad_values():
    assert [source_index(t, 1, 25.0, "pingpong") for t in range(3)] == [0, 0, 0]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="frame rate"):
            source_index(0, 10, bad)
    with pytest.raises(ValueError, match="no frames"):
        source_index(0, 0, 25.0)
    with pytest.raises(ValueError, match="past_end"):
        source_index(0, 10, 25.0, "bounce")


def test_schedule_lists_window_times_for_the_log():
    plan = plan_long_video(250)
    lines = reference_schedule(plan, 375, 30.0).describe(plan)
    assert lines[1] == "window 2/4 (video 2.88 s) <- source frame 86 (2.87 s)"
