"""Sequence-parallel (Ulysses) and guidance-parallel sampling on CPU: 4 spawned processes in a gloo
group (and two pairs of it) must reproduce the single-process forward and sampling step.

The work happens in tests/sp_worker.py; this module starts the processes, never leaves one
behind, and checks the errors every rank measured."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import sp_worker  # noqa: E402

WORLD = 4
TIMEOUT_S = 120
# fp32 on both sides; only the order of some sums differs (attention over chunks vs the whole).
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def errors(tmp_path_factory) -> dict[int, dict[str, float]]:
    out = tmp_path_factory.mktemp("sp")
    sp_worker.spawn(sp_worker.run, WORLD, str(out), TIMEOUT_S)
    return {r: json.loads((out / f"rank{r}.json").read_text()) for r in range(WORLD)}


def _check(errors, prefix: str) -> None:
    found = {f"rank{r}:{k}": v for r, e in errors.items() for k, v in e.items()
             if k.startswith(prefix)}
    assert found, f"no measurement for {prefix}"
    bad = {k: v for k, v in found.items() if not v <= TOLERANCE}
    assert not bad, f"relative error above {TOLERANCE}: {bad}"
    print(f"{prefix}: max relative error {max(found.values()):.3g}")


def test_four_ranks_forward_equals_one_process(errors):
    _check(errors, "sp4/")


def test_two_ranks_forward_equals_one_process(errors):
    _check(errors, "sp2/")


def test_two_ranks_exchanging_keys_equal_one_process(errors):
    _check(errors, "sp2keys/")


def test_two_ranks_without_overlapped_pieces_equal_one_process(errors):
    _check(errors, "sp2p1/")


def test_four_ranks_exchanging_keys_equal_one_process(errors):
    _check(errors, "sp4keys/")


def test_guidance_parallel_step_equals_one_process(errors):
    _check(errors, "guidance/")


def test_guidance_and_sequence_parallel_together(errors):
    _check(errors, "guidance+sequence/")


def test_fp8_activation_scales_are_agreed_over_the_shard(errors):
    _check(errors, "scale/")


def test_every_case_was_measured(errors):
    cases = {k for e in errors.values() for k in e}
    for tag in ("sp2", "sp4", "sp2keys", "sp2p1", "sp4keys"):
        for name in ("even_1spk", "even_2spk", "odd_1spk", "odd_2spk"):
            assert f"{tag}/{name}" in cases


@pytest.mark.parametrize("world,asked,heads,used", [
    (2, 2, 40, 2), (2, 4, 40, 4), (2, 3, 40, 2), (2, 7, 40, 5), (4, 4, 40, 2), (8, 2, 40, 1),
    (5, 4, 40, 4), (2, 1, 40, 1), (4, 2, 4, 1)])
def test_pieces_divide_each_ranks_heads(world, asked, heads, used):
    from wanvideo_infinitetalk.wanvideo.sequence_parallel import SequenceParallel

    sp = SequenceParallel(None, 0, world, asked)
    assert sp.pieces_for(heads) == used
    assert (heads // world) % used == 0


@pytest.mark.parametrize("world,exchange,sdpa,keys", [
    (2, "heads", True, False), (4, "heads", True, False), (2, "keys", True, True),
    (4, "keys", True, True), (2, "keys", False, False)])
def test_which_exchange_runs(world, exchange, sdpa, keys):
    """heads unless keys is asked for; the 8-bit kernel (no log-sum-exp) always exchanges
    heads."""
    from wanvideo_infinitetalk.wanvideo.sequence_parallel import SequenceParallel

    assert SequenceParallel(None, 0, world, exchange=exchange).by_keys(sdpa) is keys


def test_unknown_exchange_is_refused():
    from wanvideo_infinitetalk.wanvideo.sequence_parallel import SequenceParallel

    with pytest.raises(ValueError, match="exchange 'ring' is not one of"):
        SequenceParallel(None, 0, 2, exchange="ring")


def test_pieces_below_one_are_refused():
    from wanvideo_infinitetalk.wanvideo.sequence_parallel import SequenceParallel

    with pytest.raises(ValueError, match="pieces must be at least 1"):
        SequenceParallel(None, 0, 2, 0)
