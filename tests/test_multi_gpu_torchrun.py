"""The multi-GPU runtime started by torchrun instead of the pack: two "hosts" on this machine
(two launchers, --nnodes 2, node ranks 0 and 1, rendezvous on 127.0.0.1), one CPU rank each.
Rank 0 connects back to the driver (a WorkerPool that launches nothing) exactly as it would from
another host; the split window must equal the single-process one."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import mgpu_support as ms
from wanvideo_infinitetalk.multitalk import multi_gpu as mg

ROOT = os.path.dirname(ms.TESTS)


def _launchers(driver: tuple, authkey: bytes) -> list[subprocess.Popen]:
    port = mg._free_port()
    env = dict(os.environ, WANVIDEO_MGPU_DRIVER="%s:%d" % driver,
               WANVIDEO_MGPU_AUTHKEY=authkey.hex(), WANVIDEO_MGPU_THREADS="1",
               OMP_NUM_THREADS="1")
    return [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
         "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
         "-m", "wanvideo.multi_gpu_worker"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
        for node in (0, 1)]


def test_two_nodes_under_torchrun_equal_one_process():
    pool = mg.WorkerPool(ms.SPEC, mg.Placement(("cpu", "cpu")), launch=False,
                         listen=("127.0.0.1", mg._free_port()))
    launchers = _launchers(pool.listen, pool.authkey)
    try:
        pool.start()
        assert pool.info["world"] == 2 and pool.info["backend"] == "gloo"
        model = ms.tiny("cpu")
        for speakers, audio in ((1, 4.0), (2, 1.0)):      # sequence 2, then guidance 2
            j = ms.job(speakers=speakers, audio=audio)
            err = ms.rel_err(pool.sample_window(j), ms.reference(model, j))
            assert err <= 1e-5, err
        pool.shutdown()
        deadline = time.monotonic() + 60
        for p in launchers:
            p.wait(max(1.0, deadline - time.monotonic()))
            assert p.returncode == 0, p.returncode
    finally:
        pool.shutdown()
        for p in launchers:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert ms.children() == []
