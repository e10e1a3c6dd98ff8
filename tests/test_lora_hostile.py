"""Broken LoRA files: whatever is wrong (header, NaN, rank 0, shapes, alpha, overflow), merge_loras
raises one LoraError naming the file (and the layer), and a LoRA refused before merging leaves the
model as it was."""
import json
import os
import struct

import pytest
import torch

from wanvideo_infinitetalk import fp8_optimization as fo
from wanvideo_infinitetalk.wanvideo import lora
from wanvideo_infinitetalk.wanvideo.safetensors_writer import write_safetensors

from quant_support import tiny_model

Q = "blocks.0.self_attn.q"  # Linear(64, 64)
FFN = "blocks.0.ffn.2"      # Linear(128, 64): weight [64, 128]


def pair(out_f=64, in_f=64, rank=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g)


def write(tmp_path, tensors, name="style.safetensors") -> str:
    path = os.path.join(tmp_path, name)
    write_safetensors(path, tensors)
    return path


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def refused(model, source, *needles, strength=1.0, names=None) -> str:
    with pytest.raises(lora.LoraError) as info:
        lora.merge_loras(model, [(source, strength)], names=names)
    message = str(info.value)
    label = os.path.basename(source) if isinstance(source, str) else names[0]
    assert message.startswith(label) and len(message) < 700, message
    for needle in needles:
        assert needle in message, message
    return message


def test_broken_header_names_the_file(tmp_path):
    path = os.path.join(tmp_path, "overlap.safetensors")
    header = json.dumps({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                         "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + bytes(12))
    refused(tiny_model(), path, "overlap")
    with open(path, "wb") as f:
        f.write(b"\x07")
    refused(tiny_model(), path, "truncated")


def test_nan_in_a_lora_tensor_names_file_and_key(tmp_path):
    down, up = pair()
    up[5, 1] = float("nan")
    path = write(tmp_path, {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up.bfloat16()})
    refused(tiny_model(), path, f"tensor '{Q}.lora_up.weight' holds NaN/Inf values (1 of 256)")


def test_rank_zero_lora(tmp_path):
    model = tiny_model(dtype=torch.float32)
    before = snapshot(model)
    path = write(tmp_path, {f"{Q}.lora_down.weight": torch.zeros(0, 64),
                            f"{Q}.lora_up.weight": torch.zeros(64, 0)})
    refused(model, path, f"layer '{Q}'", "rank >= 1")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("down_shape, up_shape", [
    ((4, 64), (64, 3)),    # inner sizes differ
    ((4, 32), (64, 4)),    # product [64, 32] is not the weight [64, 64]
    ((4, 64), (32, 4)),    # product [32, 64]
    ((4, 32), (128, 4)),   # [128, 32] has the weight's numel: a reshape would take it silently
    ((64,), (64, 4)),      # a vector is not a factor
])
def test_factors_that_do_not_make_the_weight(tmp_path, down_shape, up_shape):
    path = write(tmp_path, {f"{Q}.lora_A.weight": torch.randn(down_shape),
                            f"{Q}.lora_B.weight": torch.randn(up_shape)})
    refused(tiny_model(), path, f"layer '{Q}'")


def test_one_bad_layer_merges_nothing(tmp_path):
    model = tiny_model(dtype=torch.float32)
    before = snapshot(model)
    down, up = pair()
    path = write(tmp_path, {f"{Q}.lora_A.weight": down, f"{Q}.lora_B.weight": up,
                            f"{FFN}.lora_A.weight": down, f"{FFN}.lora_B.weight": up})
    refused(model, path, f"layer '{FFN}'", "do not multiply to its weight (64, 128)")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("alpha, needle", [
    (torch.ones(2), "alpha has shape (2,), not a scalar"), (torch.ones(0), "not a scalar"),
    (torch.ones(2, 2), "not a scalar"),
])
def test_alpha_must_be_a_scalar(tmp_path, alpha, needle):
    down, up = pair()
    path = write(tmp_path, {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up,
                            f"{Q}.alpha": alpha})
    refused(tiny_model(), path, needle)


def test_nonfinite_alpha(tmp_path):
    down, up = pair()
    sd = {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up, f"{Q}.alpha": torch.tensor(float("inf"))}
    refused(tiny_model(), write(tmp_path, sd), f"tensor '{Q}.alpha' holds NaN/Inf")  # the file check
    refused(tiny_model(), sd, "alpha is inf", names=["in_memory.safetensors"])      # a dict source


@pytest.mark.parametrize("part, value, needle", [
    ("diff", torch.ones(10), "diff (10,) does not match its weight (64, 64)"),
    ("diff", torch.ones(64, 65), "diff (64, 65)"),
    ("diff_b", torch.ones(63), "diff_b (63,) does not match its bias (64,)"),
])
def test_deltas_of_the_wrong_size(tmp_path, part, value, needle):
    refused(tiny_model(), write(tmp_path, {f"{Q}.{part}": value}), f"layer '{Q}'", needle)


@pytest.mark.parametrize("dtype, strength", [(torch.float32, 1e38), (torch.bfloat16, 1e38),
                                             (torch.float16, 1e5)])
def test_overflowing_merge_names_file_and_layer(tmp_path, dtype, strength):
    """fp32 overflow (1e38), and a merge that is finite in fp32 but not in the stored fp16."""
    model = tiny_model(dtype=dtype)
    before = snapshot(model)
    down, up = pair()
    path = write(tmp_path, {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up})
    refused(model, path, f"merging into '{Q}' at strength {strength:g} gives NaN/Inf",
            strength=strength)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_overflowing_merge_into_a_quantized_layer(tmp_path):
    model = tiny_model(dtype=torch.bfloat16)
    fo.quantize_model(model, "fp8_e4m3fn_scaled", "cpu")
    down, up = pair(64, 128)
    path = write(tmp_path, {f"{FFN}.lora_down.weight": down, f"{FFN}.lora_up.weight": up})
    refused(model, path, f"merging into '{FFN}'", strength=1e38)


@pytest.mark.parametrize("strength", [float("nan"), float("inf")])
def test_strength_must_be_finite(tmp_path, strength):
    down, up = pair()
    path = write(tmp_path, {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up})
    refused(tiny_model(), path, "strength", strength=strength)


def test_second_lora_is_named_not_the_first(tmp_path):
    down, up = pair()
    good = write(tmp_path, {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up}, "good.safetensors")
    bad = write(tmp_path, {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up[:, :3]},
                "bad.safetensors")
    with pytest.raises(lora.LoraError, match=r"^bad\.safetensors: layer 'blocks\.0\.self_attn\.q'"):
        lora.merge_loras(tiny_model(), [(good, 1.0), (bad, 1.0)])
