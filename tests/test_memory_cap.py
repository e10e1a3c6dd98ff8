"""Device memory readings honour PyTorch's per-process cap (set_per_process_memory_fraction), the
way bench/e2e.py rehearses a 12 / 16 / 24 GB card on a big GPU: the pack's budgets and automatic
BlockSwap must see the capped card, not the physical one."""
from __future__ import annotations

import os
import types

import pytest
import torch

from wanvideo_infinitetalk.wanvideo import memory
from wanvideo_infinitetalk.wanvideo.swap_sizing import free_device_bytes

GiB = 1 << 30


def fake_cuda(monkeypatch, free, total, allocated, reserved, fraction):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda d=None: allocated)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda d=None: reserved)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda d=None: fraction,
                        raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d=None: types.SimpleNamespace(total_memory=total))


@pytest.mark.parametrize("fraction, want_free, want_total", [
    (1.0, 100 * GiB + 1 * GiB, 140 * GiB),  # no cap: driver free + the allocator's unused cache
    (0.1, 14 * GiB - 3 * GiB, 14 * GiB),    # capped: the cap minus what tensors occupy
])
def test_readings_follow_the_cap(monkeypatch, fraction, want_free, want_total):
    fake_cuda(monkeypatch, free=100 * GiB, total=140 * GiB, allocated=3 * GiB,
              reserved=4 * GiB, fraction=fraction)
    cuda = torch.device("cuda", 0)
    assert memory.device_available_bytes(cuda) == want_free
    assert memory.device_total_bytes(cuda) == want_total
    assert free_device_bytes(cuda) == want_free


@pytest.mark.parametrize("device", [torch.device("cuda"), "cuda", torch.device("cuda", 1)])
def test_a_device_without_index_reads_the_current_devices_cap(monkeypatch, device):
    """torch's getter refuses a bare "cuda" with ValueError (bench/window.py hit it on an H200)."""
    fake_cuda(monkeypatch, free=100 * GiB, total=140 * GiB, allocated=0, reserved=0, fraction=1.0)
    caps = {0: 1.0, 1: 0.1}

    def getter(d):
        if not isinstance(d, int):
            raise ValueError(f"Expected a torch.device with a specified index or an integer, "
                             f"but got:{d}")
        return caps[d]

    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", getter)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert memory.device_total_bytes(device) == 14 * GiB


def test_budget_refusal_names_the_capped_figure(monkeypatch):
    fake_cuda(monkeypatch, free=100 * GiB, total=140 * GiB, allocated=0, reserved=0,
              fraction=12 / 140)
    with pytest.raises(memory.MemoryBudgetError, match=r"needs about 21\.5 GB, 12\.9 GB"):
        memory.require_device(20 * GiB, torch.device("cuda", 0), "the test buffer")


def test_torch_without_the_getter_reports_no_cap(monkeypatch):
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction", raising=False)
    fake_cuda(monkeypatch, free=10 * GiB, total=20 * GiB, allocated=0, reserved=0, fraction=1.0)
    monkeypatch.delattr(torch.cuda, "get_per_process_memory_fraction")
    assert memory.device_total_bytes(torch.device("cuda", 0)) == 20 * GiB


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_real_cap_refuses_what_the_reading_refuses():
    dev = torch.device("cuda", torch.cuda.current_device())
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(4 * GiB / total, dev)
    try:
        assert abs(memory.device_total_bytes(dev) - 4 * GiB) < 1 << 20
        avail = memory.device_available_bytes(dev)
        assert avail <= 4 * GiB
        small = torch.empty(int(avail * 0.9), dtype=torch.uint8, device=dev)
        with pytest.raises(torch.OutOfMemoryError):
            torch.empty(int(avail * 0.2) + (64 << 20), dtype=torch.uint8, device=dev)
        del small
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        torch.cuda.empty_cache()


def test_freed_host_memory_goes_back_to_the_os():
    """The loading pattern that left holes in glibc's heap (a tensor read, its replacement kept,
    the original freed; sizes growing so no hole fits the next one) ends at the kept bytes once
    return_freed_host_memory is in force, and with holes without it. A child process: the
    setting is process-wide, and the child's own RSS is read. Both children first free a 24 MiB
    block, which (without the setting) raises glibc's dynamic threshold to 24 MiB the way the
    first large free of a load does."""
    import subprocess
    import sys

    code = r'''
import sys, torch
sys.path.insert(0, sys.argv[1])
import conftest
from wanvideo_infinitetalk.wanvideo import memory
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
if sys.argv[2] == "on":
    memory.return_freed_host_memory()
torch.ones(24 << 20, dtype=torch.uint8).fill_(1)
base = rss()
keep = []
for i in range(40):
    read = torch.empty((8 << 20) + i * (256 << 10), dtype=torch.uint8).fill_(1)
    keep.append(torch.empty(20 << 20, dtype=torch.uint8).fill_(2))  # fits no hole
    del read
print(sum(t.numel() for t in keep), rss() - base)
'''
    tests = os.path.dirname(os.path.abspath(__file__))
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc only")
    grown = {}
    for mode in ("on", "off"):
        out = subprocess.run([sys.executable, "-c", code, tests, mode], capture_output=True,
                             text=True, env=dict(os.environ, MALLOC_ARENA_MAX="2"), timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        grown[mode] = [int(x) for x in out.stdout.split()[-2:]]
    kept, end = grown["on"]
    assert end < kept + 40e6, grown  # the 40 reads (330 MiB) went back to the OS
    assert grown["off"][1] > kept + 250e6, grown  # without it they stay as holes in the heap
