"""The layout invariant under hostile inputs: strided views, views at byte offsets 1-15, and
safetensors files whose data starts at any offset (odd ones included, for 1-byte fp8 tensors)."""
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.config import WanConfig
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model, load_model, storage_dtype_policy
from wanvideo_infinitetalk.wanvideo.safetensors_writer import write_safetensors
from wanvideo_infinitetalk.wanvideo.tiny_models import random_state_dict

FUZZ_CFG = WanConfig(dim=128, ffn_dim=256, num_heads=1, num_layers=1, in_dim=36, out_dim=16,
                     text_dim=64, freq_dim=32, clip_dim=32, has_image_embedding=True)
STATE = random_state_dict(FUZZ_CFG, seed=7)
KEYS = sorted(STATE)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def offset_view(t: torch.Tensor, offset: int) -> torch.Tensor:
    """Same values, data pointer at `offset` bytes past an allocation boundary."""
    raw = bytearray(t.numel() * t.element_size() + 64)
    base = torch.frombuffer(raw, dtype=torch.uint8)
    shift = (-base.data_ptr()) % 64 + offset
    view = torch.frombuffer(raw, dtype=t.dtype, count=t.numel(), offset=shift).view(t.shape)
    view.copy_(t)
    return view


def transposed_view(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(0, 1).contiguous().transpose(0, 1) if t.dim() >= 2 else t[::1]


hostile = st.tuples(st.sampled_from(["plain", "transposed", "offset"]), st.integers(1, 15))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(hostile, min_size=len(KEYS), max_size=len(KEYS)), st.sampled_from(DTYPES),
       st.sampled_from(DTYPES))
def test_hostile_state_dicts_materialize_aligned(kinds, stored, base):
    sd = {}
    for key, (kind, offset) in zip(KEYS, kinds):
        value = STATE[key].to(stored)
        sd[key] = {"plain": value, "transposed": transposed_view(value),
                   "offset": offset_view(value, offset)}[kind]
    model = build_meta_model(FUZZ_CFG)
    placement.materialize(model, sd, torch.device("cpu"), dtype_for=storage_dtype_policy(base))
    assert placement.check_layout(model) == []
    for name, value in model.state_dict().items():
        assert torch.equal(value.float(), STATE[name].to(stored).to(value.dtype).float()), name


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(st.integers(0, 15), st.sampled_from([torch.float8_e4m3fn, torch.float8_e5m2, torch.bfloat16,
                                             torch.float16]), st.permutations(KEYS))
def test_files_at_any_offset_load_aligned(tmp_path, start, dtype, order):
    tensors = {}
    for key in order:
        value = STATE[key]
        tensors[key] = value.to(dtype) if (value.dim() == 2 or dtype not in (
            torch.float8_e4m3fn, torch.float8_e5m2)) else value.to(torch.bfloat16)
    # An odd-sized 1-byte tensor first puts every following tensor at an odd offset.
    tensors = {"zz_odd_marker": torch.zeros(3, dtype=torch.uint8), **tensors}
    path = tmp_path / f"fuzz_{start}.safetensors"
    write_safetensors(str(path), tensors, data_start_mod16=start)
    loaded = load_model(str(path), base_dtype="fp32")
    assert loaded.report["layout_violations"] == []
    assert placement.check_layout(loaded.model) == []
    assert loaded.report["unused_keys"]["examples"] == ["zz_odd_marker"]
    for name, value in loaded.model.state_dict().items():
        assert torch.equal(value, tensors[name].float()), name
