"""The transports of the Ulysses exchange (wanvideo/peer_copy.py): option checks and fallbacks on
CPU; on two GPUs, the copy-engine transport gives the same bytes as NCCL send/recv and both equal
unsplit attention within bf16 rounding."""
from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import conftest  # noqa: E402,F401
import sp_worker  # noqa: E402
from wanvideo_infinitetalk.wanvideo import peer_copy  # noqa: E402
from wanvideo_infinitetalk.wanvideo.sequence_parallel import SequenceParallel  # noqa: E402

TIMEOUT_S = 180


def test_unknown_transport_is_refused():
    with pytest.raises(ValueError, match="transport 'dma' is not one of"):
        SequenceParallel(None, 0, 2, transport="dma")


def test_copy_engines_need_cuda_tensors():
    assert "not a CUDA device" in peer_copy.unavailable(None, torch.device("cpu"))


def _shard(transport: str, world: int = 2):
    return SimpleNamespace(sp=SequenceParallel(None, 0, world, transport=transport))


@pytest.mark.parametrize("transport", ["auto", "send_recv"])
def test_cpu_tensors_travel_by_send_recv(transport):
    like = torch.zeros(1, 4, 2, 8)
    link = peer_copy.link(_shard(transport), (1, 2, 1, 4, 3, 1, 8), (1, 2, 1, 4, 1, 8), like)
    assert link.name == "send_recv"
    send, recv, got = link.buffers()
    assert send.shape == recv.shape == (1, 2, 1, 4, 3, 1, 8) and got.shape == (1, 2, 1, 4, 1, 8)


def test_asking_for_copy_engines_on_cpu_names_why_not():
    like = torch.zeros(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="'copy_engine' cannot run: the tensors are on cpu"):
        peer_copy.link(_shard("copy_engine"), (1, 2, 1, 4, 3, 1, 8), (1, 2, 1, 4, 1, 8), like)


def test_one_rank_needs_no_copy_engine():
    like = torch.zeros(1, 4, 2, 8)
    link = peer_copy.link(_shard("copy_engine", world=1), (1, 1, 1, 4, 3, 2, 8),
                          (1, 1, 1, 4, 2, 8), like)
    assert link.name == "send_recv"


def test_all_ranks_agree_when_one_gpu_lacks_peer_access(tmp_path):
    """GPU 0 cannot map GPU 1's memory: rank 0 sees it, ranks 1 and 2 learn it through the
    agreement, and all three keep send/recv (a rank alone on copy engines would hang)."""
    import exchange_worker

    sp_worker.spawn(exchange_worker.peer_verdict, 3, str(tmp_path), TIMEOUT_S)
    why = [json.loads((tmp_path / f"verdict{r}.json").read_text())["why"] for r in range(3)]
    assert why[0] == "cuda:0 has no peer access to cuda:1"
    assert why[1] == why[2] == "another rank's GPU has no peer access to the group's other GPUs"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_copy_engine_exchange_equals_send_recv_on_two_gpus(tmp_path):
    import exchange_worker

    for key, value in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                       "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ.setdefault(key, value)   # never NVLink multicast (shared hosts)
    sp_worker.spawn(exchange_worker.run, 2, str(tmp_path), TIMEOUT_S)
    result = json.loads((tmp_path / "result.json").read_text())
    equal = {k: v for k, v in result.items() if "/equal/" in k}
    assert len(equal) == 2 * 3 * 2 and all(equal.values()), equal
    errors = {k: v["vs_unsplit"] for k, v in result.items() if "/equal/" not in k}
    assert max(errors.values()) < 1e-2, errors   # bf16 rounding of the same attention
    assert all(v["first_keys_equal"] for k, v in result.items() if "/equal/" not in k)
