"""On CUDA: fp8 files at 8 mod 16 load with zero violations and their tensors feed _scaled_mm and
SDPA; misaligned attention inputs are repaired by the guard instead of crashing or going wrong."""
import pytest
import torch

from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.attention import attention
from wanvideo_infinitetalk.wanvideo.checkpoint import open_checkpoint
from wanvideo_infinitetalk.wanvideo.loader import load_model
from wanvideo_infinitetalk.wanvideo.safetensors_writer import write_safetensors
from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, cast_for_storage, random_state_dict

pytestmark = pytest.mark.gpu


def misaligned_cuda(shape, dtype, offset_bytes):
    numel = 1
    for s in shape:
        numel *= s
    raw = torch.empty(numel * torch.finfo(dtype).bits // 8 + 64, dtype=torch.uint8, device="cuda")
    view = raw[offset_bytes:offset_bytes + numel * torch.finfo(dtype).bits // 8].view(dtype).view(shape)
    view.copy_(torch.randn(shape, device="cuda").to(dtype))
    return view


def test_fp8_file_at_8_mod_16_loads_on_cuda_and_feeds_kernels(tmp_path):
    sd = cast_for_storage(random_state_dict(TINY_I2V), torch.float8_e4m3fn)
    path = tmp_path / "fp8_8mod16.safetensors"
    write_safetensors(str(path), sd, data_start_mod16=8)
    ckpt = open_checkpoint(str(path))
    assert all(info.start % 16 == 8 for info in ckpt.tensors.values() if info.dtype.itemsize == 1)
    loaded = load_model(str(path), device="cuda", base_dtype="bf16")
    assert loaded.report["layout_violations"] == []
    assert placement.check_layout(loaded.model) == []
    # the file's own fp8 weight, made ready through placement, into _scaled_mm
    w = placement.fresh_copy(ckpt.read("blocks.0.ffn.0.weight"), device="cuda")  # [512, 256] e4m3
    a = placement.kernel_ready(torch.randn(64, 256, device="cuda").to(torch.float8_e4m3fn))
    one = torch.ones((), device="cuda")
    out = torch._scaled_mm(a, w.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    ref = a.float() @ w.float().t()
    assert torch.allclose(out.float(), ref, rtol=2e-2, atol=2e-2)
    # SDPA through the model's attention
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, 16, 3, 16, 16, device="cuda", generator=g)
    y = torch.randn(1, 20, 3, 16, 16, device="cuda", generator=g)
    with torch.no_grad():
        res = loaded.model(x, torch.tensor([500.0], device="cuda"),
                           torch.randn(1, 8, 4096, device="cuda", generator=g),
                           torch.randn(1, 257, 1280, device="cuda", generator=g), y)
    torch.cuda.synchronize()
    assert torch.isfinite(res).all()


@pytest.mark.parametrize("offset", [2, 8])
def test_attention_guard_repairs_misaligned_inputs(offset):
    q, k, v = (misaligned_cuda((1, 1024, 8, 128), torch.bfloat16, offset) for _ in range(3))
    assert q.data_ptr() % 16 == offset
    out = attention(q, k, v)
    torch.cuda.synchronize()
    ref = torch.softmax((q.float().transpose(1, 2) @ k.float().transpose(1, 2).transpose(-1, -2))
                        / 128 ** 0.5, dim=-1) @ v.float().transpose(1, 2)
    assert (out.float() - ref.transpose(1, 2)).abs().max().item() < 3e-2
