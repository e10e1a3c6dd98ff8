"""Host RAM while quantizing on load: the peak stays near the final (quantized) model, never the
full-precision one. A mid-size Wan config (dim 1024, ffn 4096, 12 blocks, a ~430 MB bf16 file) is
loaded with fp8_e4m3fn_scaled in a fresh process (tests/load_memory.py), once quantizing while
loading and once in the older order (everything in bf16 first), which must exceed the bound: that
is what shows the bound measures something.

glibc returns a freed block to the system only when it was mmap'ed, and its adaptive mmap
threshold (up to 32 MB) sends blocks of this model's size (4-16 MB) to its heap, where freed
copies stay in the RSS. Every transient copy of a 14B model (52 MB and more, but the
InfiniteTalk kv layers) is above that cap, so the subprocess fixes the threshold at 1 MB to give
the small model the allocation behaviour of the big one.
"""
import json
import os
import subprocess
import sys

import pytest

from wanvideo_infinitetalk.wanvideo.config import WanConfig

from load_memory import write_random_checkpoint

MID = WanConfig(dim=1024, ffn_dim=4096, num_heads=8, num_layers=12, in_dim=16, out_dim=16)
MIB = 1 << 20
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "load_memory.py")


def measure(path: str, mode: str) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MIB), WANVIDEO_CHECK_LAYOUT="0")
    res = subprocess.run([sys.executable, HELPER, path, "fp8_e4m3fn_scaled", mode], env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_peak_host_memory_of_quantizing_on_load(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/statm")
    path = str(tmp_path / "wan_mid_bf16.safetensors")
    file_bytes = write_random_checkpoint(path, MID)
    new, old = measure(path, "streamed"), measure(path, "old")
    assert new["final_bytes"] == old["final_bytes"] and new["quantized_layers"] == 12 * 10
    bound = new["final_bytes"] + 4 * new["largest_fp32_layer"] + 64 * MIB
    for run in (new, old):
        print(f"{run['mode']:>8}: peak above baseline {run['peak_above_baseline'] / MIB:7.1f} MiB, "
              f"final model {run['final_bytes'] / MIB:6.1f} MiB, bound {bound / MIB:6.1f} MiB, "
              f"bf16 file {file_bytes / MIB:6.1f} MiB (high-water mark reset: {run['peak_reset']})")
    assert new["peak_above_baseline"] <= bound
    assert old["peak_above_baseline"] > bound  # the bf16 model fully in memory first
