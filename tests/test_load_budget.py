"""A checkpoint that cannot fit is refused before its first weight is read, with the numbers;
the estimate matches the loaded model's real size."""
from __future__ import annotations

import os

import pytest
import torch

from wanvideo_infinitetalk.wanvideo import checkpoint, load_budget
from wanvideo_infinitetalk.wanvideo.loader import load_model
from wanvideo_infinitetalk.wanvideo.memory import HOST_LIMIT_ENV, MemoryBudgetError
from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict, write_checkpoint


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("budget") / "wan_tiny.safetensors")
    return write_checkpoint(random_state_dict(TINY_I2V, seed=0), path, dtype=torch.bfloat16)[0]


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size()
               for t in list(model.parameters()) + list(model.buffers())
               if not t.is_meta)


@pytest.mark.parametrize("dtype, quantization", [
    (torch.bfloat16, "none"), (torch.float32, "none"), (torch.bfloat16, "fp8_e4m3fn_scaled")])
def test_estimate_matches_the_loaded_model(tiny_file, dtype, quantization):
    ckpt = checkpoint.open_checkpoint(tiny_file)
    estimate = load_budget.loaded_bytes(ckpt, dtype, quantization)
    real = model_bytes(load_model(tiny_file, base_dtype=dtype, quantization=quantization).model)
    print(f"{dtype} {quantization}: estimate {estimate:,} B, loaded {real:,} B")
    assert abs(estimate - real) <= 0.15 * real     # RoPE tables and scales are not counted


def test_a_model_larger_than_host_ram_is_refused_before_reading(tiny_file, monkeypatch):
    monkeypatch.setenv(HOST_LIMIT_ENV, str(64 * 1024))           # a 64 KiB machine
    reads = []
    monkeypatch.setattr(checkpoint, "read_tensor",
                        lambda *a, **k: reads.append(1) or pytest.fail("a weight was read"))
    with pytest.raises(MemoryBudgetError) as e:
        load_model(tiny_file, base_dtype="bf16")
    msg = str(e.value)
    assert os.path.basename(tiny_file) in msg and "needs about" in msg and "GB available" in msg
    assert "fp8" in msg and reads == []
