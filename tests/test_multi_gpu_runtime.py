"""The multi-GPU runtime on CPU (gloo): worker processes started by the pack, the model loaded in
every worker from one ModelSpec, window jobs split by sequence and / or guidance parallelism.

Every split must reproduce the single-process window (fp32, <= 1e-5 relative), an interrupt
must stop every rank at the same block and leave the workers usable, a killed worker must give
a clear error naming its rank and leave no process behind, and the next pool starts afresh."""
from __future__ import annotations

import os
import signal
import time

import pytest

import mgpu_support as ms
from wanvideo_infinitetalk.multitalk import multi_gpu as mg
from wanvideo_infinitetalk.multitalk import multi_gpu_worker as mw
from wanvideo_infinitetalk.wanvideo.sampling import SamplingCallbacks, SamplingInterrupted

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model():
    return ms.tiny("cpu")


@pytest.fixture(scope="module")
def pool2():
    pool = mg.WorkerPool(ms.SPEC, mg.Placement.parse("cpu:2")).start()
    yield pool
    pool.shutdown()
    assert not ms.alive(pool.pids())


@pytest.fixture(scope="module")
def pool4():
    pool = mg.WorkerPool(ms.SPEC, mg.Placement.parse("cpu:4"), threads=1).start()
    yield pool
    pool.shutdown()
    assert not ms.alive(pool.pids())


def _check(pool, model, job, mode, layout):
    """layout: (sequence, guidance) for one round of every pass, or the rounds
    [(sequence, guidance, plan indices), ...] of a mixed schedule."""
    got = pool.sample_window(job, mode=mode)
    stats = pool.info["last_stats"]
    passes = len(job.guidance.passes)
    rounds = [(*layout, tuple(range(passes)))] if isinstance(layout, tuple) else layout
    assert [(r["sequence"], r["guidance"], tuple(r["passes"])) for r in stats["rounds"]] \
        == rounds, stats
    assert (stats["sequence"], stats["guidance"]) == rounds[0][:2], stats
    err = ms.rel_err(got, ms.reference(model, job))
    assert err <= TOLERANCE, f"{mode} {layout}: relative error {err:.3g}"


# 3 passes on 2 ranks: passes 0 and 1 one per rank, then pass 2 split over both
HYBRID_2 = [(1, 2, (0, 1)), (2, 1, (2,))]
# 3 passes on 4 ranks: passes 0 and 1 each split over a pair, then pass 2 over all 4
HYBRID_4 = [(2, 2, (0, 1)), (4, 1, (2,))]

# (latent grid, speakers, text scale, audio scale, mode) -> (sequence, guidance) degrees or rounds
CASES_2 = [
    (ms.ODD, 1, 5.0, 4.0, "auto", HYBRID_2),
    (ms.EVEN, 2, 5.0, 4.0, "auto", HYBRID_2),
    (ms.ODD, 2, 5.0, 4.0, "sequence", (2, 1)),
    (ms.EVEN, 2, 5.0, 1.0, "auto", (1, 2)),         # 2 passes, one per rank
    (ms.ODD, 2, 5.0, 4.0, "guidance", (1, 2)),      # 3 passes on 2 ranks: one rank idles once
    (ms.EVEN, 1, 1.0, 1.0, "auto", (2, 1)),         # one pass per step (distilled LoRAs)
]
CASES_4 = [
    (ms.ODD, 2, 5.0, 4.0, "auto", HYBRID_4),
    (ms.EVEN, 1, 5.0, 4.0, "auto", HYBRID_4),
    (ms.EVEN, 1, 5.0, 4.0, "sequence", (4, 1)),
    (ms.ODD, 2, 5.0, 1.0, "auto", (2, 2)),          # both combined: 2 passes x 2 token chunks
    (ms.EVEN, 2, 5.0, 4.0, "guidance", (2, 2)),
]


@pytest.mark.parametrize("latent, speakers, text, audio, mode, layout", CASES_2)
def test_two_workers_equal_one_process(pool2, model, latent, speakers, text, audio, mode, layout):
    _check(pool2, model, ms.job(latent, speakers, text=text, audio=audio), mode, layout)


@pytest.mark.parametrize("latent, speakers, text, audio, mode, layout", CASES_4)
def test_four_workers_equal_one_process(pool4, model, latent, speakers, text, audio, mode,
                                        layout):
    _check(pool4, model, ms.job(latent, speakers, text=text, audio=audio), mode, layout)


@pytest.mark.parametrize("world, passes, heads, rounds", [
    (2, 3, 4, HYBRID_2),
    (4, 3, 4, HYBRID_4),
    (3, 3, 6, [(1, 3, (0, 1, 2))]),
    (2, 2, 4, [(1, 2, (0, 1))]),
    (2, 1, 4, [(2, 1, (0,))]),
    (4, 2, 4, [(2, 2, (0, 1))]),
    (8, 3, 40, [(4, 2, (0, 1)), (8, 1, (2,))]),
    (6, 4, 40, [(2, 3, (0, 1, 2, 3))]),   # the 4th pass fits no layout alone: today's one
])
def test_auto_schedule_rounds(world, passes, heads, rounds):
    assert mw.choose_rounds(world, passes, "auto", heads) == rounds


def test_the_log_names_every_round():
    rounds = [{"sequence": 1, "guidance": 2, "passes": [0, 1]},
              {"sequence": 2, "guidance": 1, "passes": [2]}]
    assert mg.describe_rounds({"sequence": 1, "guidance": 2, "rounds": rounds}) == \
        "passes 1-2: sequence 1 x guidance 2, then pass 3: sequence 2 x guidance 1"
    assert mg.describe_rounds({"sequence": 2, "guidance": 1, "rounds": rounds[1:]}) == \
        "sequence 2 x guidance 1"


def test_unknown_sequence_options_are_refused():
    pool = mg.WorkerPool.__new__(mg.WorkerPool)   # validation happens before any worker is asked
    pool.placement = mg.Placement(("cpu", "cpu"))
    with pytest.raises(ValueError, match=r"sp_options \['ring'\] are not SequenceParallel"):
        pool.sample_window(ms.job((3, 8, 8), 1), sp_options={"ring": 2})
    with pytest.raises(ValueError, match=r"transport 'dma' is not one of \('auto', 'send_recv'"):
        pool.sample_window(ms.job((3, 8, 8), 1), sp_options={"transport": "dma"})


def test_fixed_modes_keep_one_layout_for_every_pass():
    assert mw.choose_rounds(2, 3, "sequence", 4) == [(2, 1, (0, 1, 2))]
    assert mw.choose_rounds(2, 3, "guidance", 4) == [(1, 2, (0, 1, 2))]
    assert mw.choose_rounds(4, 3, "guidance", 4) == [(2, 2, (0, 1, 2))]
    for mode in mg.MODES:
        with pytest.raises(ValueError, match="attention heads"):
            mw.choose_rounds(3, 2, mode, 40)


def test_progress_and_previews_come_from_rank_0(pool2):
    seen, previews = [], []
    cb = SamplingCallbacks(progress=lambda d, t: seen.append((d, t)),
                           preview=lambda i, x0: previews.append((i, tuple(x0.shape))))
    j = ms.job(steps=3)
    pool2.sample_window(j, cb)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert previews == [(i, tuple(j.noise.shape)) for i in range(3)]


@pytest.mark.parametrize("mode", ["auto", "guidance"])
def test_interrupt_stops_every_rank_at_one_block_and_workers_stay(pool2, model, mode):
    """guidance mode: 3 passes on 2 ranks, the rank with one pass joins the checks of the
    other's second pass; a stop agreed there must not leave a collective hanging. auto: the same
    3 passes in two rounds (2 side by side, then 1 split over both ranks)."""
    pids = pool2.pids()
    stop = {"at": None}
    steps = []

    def progress(done, total):
        steps.append(done)
        if done == 2 and stop["at"] is None:
            stop["at"] = time.monotonic()

    cb = SamplingCallbacks(progress=progress, should_stop=lambda: stop["at"] is not None)
    with pytest.raises(SamplingInterrupted, match="agreed before block"):
        pool2.sample_window(ms.job(steps=400), cb, mode=mode)
    latency = time.monotonic() - stop["at"]
    seen = pool2.info["last_stats"]
    # the request rode on one block's exchange and every rank stopped at the next block
    assert seen["seen_at_check"] is not None
    assert seen["stopped_at_check"] - seen["seen_at_check"] == 1, seen
    # one step here is 3 passes x 2 blocks; stopping within a block leaves at most one
    # progress report in flight
    assert steps[-1] <= 3, steps
    assert latency < 2.0, latency
    assert pool2.alive and pool2.pids() == pids
    j = ms.job(speakers=2)
    assert ms.rel_err(pool2.sample_window(j, mode=mode), ms.reference(model, j)) <= TOLERANCE


def test_error_on_the_workers_is_reported_and_stops_them(pool4):
    bad = ms.job()
    bad.y = bad.y[:, :5]          # 21 input channels instead of 36
    with pytest.raises(mg.WorkerError, match="channels") as e:
        pool4.sample_window(bad)
    assert "rank" in str(e.value) and "next run starts new ones" in str(e.value)
    assert not pool4.alive
    assert not ms.alive(pool4.pids())


def test_killed_worker_gives_a_clear_error_and_the_next_pool_starts_fresh(model):
    pool = mg.shared_pool(ms.SPEC, mg.Placement.parse("cpu:2"))
    old = pool.pids()
    killed = []

    def progress(done, total):
        if not killed:
            os.kill(old[1], signal.SIGKILL)
            killed.append(done)

    with pytest.raises(mg.WorkerError, match=r"rank 1 \(cpu\) was killed by SIGKILL"):
        pool.sample_window(ms.job(steps=400), SamplingCallbacks(progress=progress))
    assert not ms.alive(old)
    fresh = mg.shared_pool(ms.SPEC, mg.Placement.parse("cpu:2"))
    try:
        assert fresh is not pool and set(fresh.pids()).isdisjoint(old)
        j = ms.job()
        assert ms.rel_err(fresh.sample_window(j), ms.reference(model, j)) <= TOLERANCE
    finally:
        mg.shutdown_shared()
    assert not ms.alive(fresh.pids())


def test_placement_parsing():
    assert mg.Placement.parse("0,1", cuda_count=2).devices == ("cuda:0", "cuda:1")
    assert mg.Placement.parse("all", cuda_count=3).world == 3
    assert mg.Placement.parse("cpu:4").backend == "gloo"
    for bad in ("0,0", "2", "x", "", "cpu:5", "cpu:0", "cpu:x"):
        with pytest.raises(ValueError):
            mg.Placement.parse(bad, cuda_count=2)
    with pytest.raises(ValueError):
        mg.Placement.parse("0,1", mode="fast", cuda_count=2)


def test_no_worker_process_is_left_behind(pool2, pool4):
    pool2.shutdown()
    pool4.shutdown()
    assert ms.children() == []


def test_messages_cross_between_different_pack_names():
    """ComfyUI imports the pack under its folder's path, the workers as wanvideo_infinitetalk:
    a class pickled by one must arrive as the other's own class."""
    import importlib
    import pickle

    import _pack

    _pack.load_pack("another_name_for_the_pack")
    other = importlib.import_module("another_name_for_the_pack.multitalk.window_job")
    j = ms.job()
    theirs = other.WindowJob(**{k: getattr(j, k) for k in j.__dataclass_fields__})
    payload = pickle.dumps(("window", theirs))
    got = mg._PackUnpickler(payload, "another_name_for_the_pack").load()[1]
    assert type(got).__module__ == "wanvideo_infinitetalk.multitalk.window_job"
    assert got.noise.equal(j.noise) and got.label == j.label
