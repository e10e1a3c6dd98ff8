"""Every layout and dtype the generator writes loads to identical weights and output; the inspect
CLI reports them; unusable files fail with one clear message naming the file."""
import json
import math
import os
import pathlib
import subprocess
import sys

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file, save_file

from wanvideo_infinitetalk.wanvideo import placement
from wanvideo_infinitetalk.wanvideo.checkpoint import CheckpointError
from wanvideo_infinitetalk.wanvideo.config import WAN21_14B_I2V, infer_config
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model, load_model
from wanvideo_infinitetalk.wanvideo.tiny_models import (TINY_I2V, VARIANTS, random_state_dict,
                                                        write_tiny_models)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS_JSON = os.path.join(ROOT, "tests", "data", "wan21_i2v_14b_infinitetalk_keys.json")  # copy of shared/data


@dataclass
class TinyModels:
    root: pathlib.Path
    written: dict

    def __truediv__(self, other):
        return self.root / other


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    return TinyModels(d, write_tiny_models(str(d)))


def effective_state(model):
    """state_dict with quantized layers' weights dequantized (they live in non-persistent buffers)."""
    state = {k: v.float() for k, v in model.state_dict().items()}
    for name, module in model.named_modules():
        if hasattr(module, "dequantize") and hasattr(module, "in_features"):
            state[f"{name}.weight"] = module.dequantize().float()
    return state


def forward(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    y = torch.randn(1, 20, 2, 4, 6, generator=g)
    with torch.no_grad():
        return model(x, torch.tensor([250.0]), torch.randn(1, 5, 4096, generator=g),
                     torch.randn(1, 257, 1280, generator=g), y)


def test_every_variant_loads_identically(models_dir):
    reference = random_state_dict(TINY_I2V, seed=0)
    outputs = {}
    for name, layout, dtype, _ in VARIANTS:
        loaded = load_model(models_dir.written[name], base_dtype="fp32")
        report = loaded.report
        assert report["layout"] == layout, name
        assert report["stored_dtype"] == str(dtype).replace("torch.", ""), name
        assert report["layout_violations"] == []
        assert placement.check_layout(loaded.model) == []
        state = effective_state(loaded.model)
        assert set(state) == set(reference)
        for key, value in reference.items():
            assert torch.equal(state[key], value), (name, key)
        if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # loaded as they are, not up-cast
            assert report["quantization"]["kind"] == "fp8"
        outputs[name] = forward(loaded.model)
    first = next(iter(outputs.values()))
    for name, out in outputs.items():
        assert torch.equal(out, first), name


def test_sharded_set_from_one_shard(models_dir):
    shard = models_dir / "diffusion_models" / "wan21_tiny_i2v_sharded" / \
        "diffusion_pytorch_model-00002-of-00002.safetensors"
    loaded = load_model(str(shard), base_dtype="fp32")
    assert len(loaded.report["files"]) == 2


def test_14b_config_and_keys_on_meta():
    with open(KEYS_JSON) as f:
        shapes = {k: tuple(v) for k, v in json.load(f)["keys"].items()}
    base = {k: v for k, v in shapes.items() if "audio" not in k and "norm_x" not in k}
    assert len(base) == 1303
    cfg = infer_config(base)
    assert cfg == WAN21_14B_I2V
    model = build_meta_model(cfg)
    state = model.state_dict()
    assert {k: tuple(v.shape) for k, v in state.items()} == base
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(math.prod(s) for s in base.values())
    assert abs(params / 1e9 - 16.4) < 0.05


def run_inspect(*args):
    return subprocess.run([sys.executable, "-m", "wanvideo.inspect", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_inspect_cli_reports_json(models_dir):
    res = run_inspect(str(models_dir / "diffusion_models" / "wan21_tiny_i2v_comfy_fp16.safetensors"),
                      "--dtype", "fp32")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["layout"] == "comfy" and report["model_type"] == "i2v"
    assert report["config"] == {"dim": 256, "ffn_dim": 512, "num_heads": 2, "num_layers": 2,
                                "in_dim": 36, "out_dim": 16, "text_dim": 4096, "freq_dim": 256}
    assert report["stored_dtype"] == "float16"
    assert report["layout_violations"] == []
    assert report["parameters"] == sum(v.numel() for v in random_state_dict(TINY_I2V).values())
    for key in ("quantization", "infinitetalk"):
        assert key in report


def bad_files(tmp_path, models_dir):
    good = str(models_dir / "diffusion_models" / "wan21_tiny_i2v.safetensors")
    sd = load_file(good)
    files = {}
    files["not_wan"] = tmp_path / "not_wan.safetensors"
    save_file({"encoder.conv.weight": torch.zeros(4, 4)}, str(files["not_wan"]))
    files["truncated"] = tmp_path / "truncated.safetensors"
    data = open(good, "rb").read()
    files["truncated"].write_bytes(data[: len(data) // 2])
    files["empty"] = tmp_path / "empty.safetensors"
    files["empty"].write_bytes(b"")
    missing = dict(sd)
    missing.pop("blocks.1.ffn.2.bias")
    files["missing_key"] = tmp_path / "missing_key.safetensors"
    save_file(missing, str(files["missing_key"]))
    wrong = dict(sd)
    wrong["blocks.0.cross_attn.k.weight"] = torch.zeros(256, 128, dtype=torch.bfloat16)
    files["shape_mismatch"] = tmp_path / "shape_mismatch.safetensors"
    save_file(wrong, str(files["shape_mismatch"]))
    return files


EXPECTED = {
    "not_wan": "not a Wan2.1 transformer",
    "truncated": "truncated",
    "empty": "empty",
    "missing_key": "blocks.1.ffn.2.bias",
    "shape_mismatch": "blocks.0.cross_attn.k.weight",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_bad_files_raise_clear_errors(kind, tmp_path, models_dir):
    path = bad_files(tmp_path, models_dir)[kind]
    with pytest.raises(CheckpointError) as info:
        load_model(str(path))
    message = str(info.value)
    assert path.name in message and EXPECTED[kind] in message, message
    res = run_inspect(str(path))
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and path.name in lines[0] and EXPECTED[kind] in lines[0]


def test_prequantized_weights_stay_fp8(models_dir):
    loaded = load_model(models_dir.written["wan21_tiny_i2v_fp8_e4m3fn.safetensors"], base_dtype="bf16")
    quantized = [m for m in loaded.model.modules() if hasattr(m, "dequantize") and hasattr(m, "in_features")]
    assert quantized and all(m.weight.dtype == torch.float8_e4m3fn for m in quantized)


def test_fp8_matmul_is_passed_to_prequantized_layers_and_checked(models_dir):
    path = models_dir.written["wan21_tiny_i2v_fp8_e4m3fn.safetensors"]
    loaded = load_model(path, base_dtype="bf16", fp8_matmul="accurate")
    quantized = [m for m in loaded.model.modules() if hasattr(m, "fast_accum")]
    assert quantized and not any(m.fast_accum for m in quantized)
    with pytest.raises(ValueError, match=r"fp8_matmul 'turbo'.*expected one of"):
        load_model(path, fp8_matmul="turbo")
