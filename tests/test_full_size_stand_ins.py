"""Full-size stand-ins (wanvideo/stand_ins.py, multitalk/stand_ins.py): their declared layouts
equal what ComfyUI's own classes and our WanModel expect, the streaming writer writes the same
bytes as writing the tensors from a dict, and the two files small enough to write here (CLIP
vision ViT-H, 1.26 GB, and the Wan VAE, 0.25 GB) load through ComfyUI's own loaders.

ComfyUI runs in a child process (tests/comfy_stand_in_child.py), like tests/test_tiny_vae.py:
its top-level packages and device probing must not leak into the test session."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from wanvideo_infinitetalk.multitalk import stand_ins as mt_stand_ins
from wanvideo_infinitetalk.wanvideo import checkpoint, stand_in_values, stand_ins
from wanvideo_infinitetalk.wanvideo.quant_files import detect_quantization
from wanvideo_infinitetalk.wanvideo.safetensors_writer import write_safetensors

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.path.join(ROOT, ".cache", "ComfyUI")
KEYS_JSON = os.path.join(ROOT, "tests", "data", "wan21_i2v_14b_infinitetalk_keys.json")
PREFIX = "model.diffusion_model."
needs_comfy = pytest.mark.skipif(not os.path.isfile(os.path.join(COMFY, "comfy", "sd.py")),
                                 reason="ComfyUI not extracted (run scripts/setup.sh)")


def run_child(mode: str, arg: str, timeout: int = 300) -> dict:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=COMFY)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "comfy_stand_in_child.py"),
                           mode, arg], cwd=COMFY, env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


def described(specs, strip: str = "") -> dict:
    return {k[len(strip):] if k.startswith(strip) else k: [list(s.shape), str(s.dtype)]
            for k, s in specs.items()}


def assert_same_layout(mine: dict, theirs: dict, dtypes: bool) -> None:
    assert sorted(set(theirs) - set(mine)) == [] and sorted(set(mine) - set(theirs)) == []
    index = 1 if dtypes else 0
    wrong = {k: (mine[k], theirs[k]) for k in mine if mine[k][: index + 1] != theirs[k][: index + 1]}
    assert wrong == {}


@pytest.fixture(scope="module")
def comfy_layouts(tmp_path_factory):
    path = tmp_path_factory.mktemp("layouts") / "wan_shapes.json"
    path.write_text(json.dumps({k: list(s.shape)
                                for k, s in stand_ins.wan_transformer_specs().items()}))
    return run_child("layouts", str(path))


@needs_comfy
def test_text_encoder_clip_vision_and_vae_match_comfyui_classes(comfy_layouts):
    # umT5: ComfyUI's Wan text encoder class with a scaled fp8 file's options, dtypes included
    # (fp8 linears, fp32 scale_weight, bf16 rest, the `scaled_fp8` marker)
    # (spiece_model is tokenizer data the file carries, not a weight of the encoder class)
    te = {k: v for k, v in described(stand_ins.umt5_xxl_specs()).items() if k != "spiece_model"}
    assert_same_layout(te, comfy_layouts["umt5"], dtypes=True)
    # CLIP vision and the VAE: ComfyUI creates some layers without a dtype, so shapes only
    assert_same_layout(described(stand_ins.clip_vision_h_specs()), comfy_layouts["clip_vision_h"],
                       dtypes=False)
    assert_same_layout(described(stand_ins.wan_vae_specs()), comfy_layouts["vae"], dtypes=False)


@needs_comfy
def test_wan_transformer_is_detected_and_matches_comfyui_wan_model(comfy_layouts):
    cfg = comfy_layouts["unet_config"]
    assert (cfg["model_type"], cfg["dim"], cfg["num_layers"], cfg["in_dim"]) == ("i2v", "5120", "40", "36")
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        assert_same_layout(described(stand_ins.wan_transformer_specs(dtype), PREFIX),
                           comfy_layouts["wan"], dtypes=False)


def test_wan_transformer_and_patch_match_the_recorded_14b_key_list():
    with open(KEYS_JSON) as f:
        recorded = json.load(f)["keys"]
    patch = mt_stand_ins.infinitetalk_patch_specs()
    base = {k: v for k, v in recorded.items() if k not in patch}
    assert len(base) == 1303 and len(patch) == 330
    assert {k: list(s.shape) for k, s in patch.items()} == {k: recorded[k] for k in patch}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        specs = stand_ins.wan_transformer_specs(dtype)
        assert {k[len(PREFIX):]: list(s.shape) for k, s in specs.items()} == base
    fp8 = stand_ins.wan_transformer_specs(torch.float8_e4m3fn)
    assert fp8[PREFIX + "blocks.7.ffn.0.weight"].dtype == torch.float8_e4m3fn
    assert fp8[PREFIX + "blocks.7.ffn.0.bias"].dtype == torch.bfloat16
    assert fp8[PREFIX + "text_embedding.0.weight"].dtype == torch.bfloat16
    assert {s.dtype for s in patch.values()} == {torch.float16}


def test_lora_text_encoder_and_wav2vec2_layouts():
    lora = stand_ins.lora_specs()
    assert len(lora) == 40 * 12 * 3
    assert lora["diffusion_model.blocks.39.ffn.0.lora_down.weight"].shape == (64, 5120)
    assert lora["diffusion_model.blocks.39.ffn.0.lora_up.weight"].shape == (13824, 64)
    assert lora["diffusion_model.blocks.0.cross_attn.k_img.alpha"].mean == 64.0
    te = stand_ins.umt5_xxl_specs()
    found = detect_quantization(list(te))
    assert found["kind"] == "scaled_fp8" and found["counts"] == {"fp8_e4m3fn_scaled": 24 * 7}
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(**mt_stand_ins.wav2vec2_config_json())
    with torch.device("meta"):
        theirs = {k: tuple(v.shape) for k, v in transformers.Wav2Vec2Model(config).state_dict().items()}
    pos = "encoder.pos_conv_embed.conv."
    renamed = {pos + "parametrizations.weight.original0": pos + "weight_g",
               pos + "parametrizations.weight.original1": pos + "weight_v"}
    theirs = {renamed.get(k, k): v for k, v in theirs.items()}
    assert mt_stand_ins.wav2vec2_shapes() == theirs


def test_text_encoder_carries_a_working_tokenizer():
    """ComfyUI's Wan tokenizer is built from the file's `spiece_model` bytes (a sentencepiece
    model proto); without it the text encode node fails with "invalid tokenizer"."""
    spm = pytest.importorskip("sentencepiece")
    s = stand_ins.umt5_xxl_specs()["spiece_model"]
    assert s.dtype == torch.uint8 and s.shape == (len(s.payload),)
    ids = spm.SentencePieceProcessor(model_proto=s.payload).encode(
        "A person talks to the camera in a calm, friendly way; 3 quick blinks!")
    assert len(ids) > 10 and max(ids) < stand_ins.UMT5_XXL["vocab"]
    assert stand_ins.tokenizer_model() == s.payload  # deterministic: same file every time
    chunks = list(stand_in_values.value_chunks("spiece_model", s))
    assert len(chunks) == 1 and chunks[0].numpy().tobytes() == s.payload


def small_specs() -> dict:
    spec = stand_in_values.spec
    return {"a.weight": spec("a.weight", (37, 11), torch.bfloat16),
            "a.bias": spec("a.bias", (37,), torch.float32),
            "b.weight": spec("b.weight", (5, 3), torch.float8_e4m3fn, std=1.0),
            "b.scale_weight": spec("b", (), torch.float32, mean=0.25, std=0.0),
            "scaled_fp8": spec("scaled_fp8", (0,), torch.float8_e4m3fn),
            "c.gamma": spec("c.gamma", (6, 1, 1, 1), torch.float16),
            "d.weight": spec("d.weight", (9, 2, 3), torch.float16)}


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equal (NaN-safe, fp8 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def test_streamed_file_equals_dict_writer_and_strict_readers(tmp_path, monkeypatch):
    monkeypatch.setattr(stand_in_values, "CHUNK_ELEMENTS", 20)  # several chunks per tensor
    specs, meta = small_specs(), {"format": "pt"}
    streamed = stand_in_values.write_specs(str(tmp_path / "streamed.safetensors"), specs, 3, meta)
    tensors = stand_in_values.materialize(specs, 3)
    write_safetensors(str(tmp_path / "dict.safetensors"), tensors, meta)
    raw = open(streamed, "rb").read()
    assert raw == (tmp_path / "dict.safetensors").read_bytes()
    infos, metadata = checkpoint.read_header(streamed)
    assert metadata == meta and set(infos) == set(specs)
    loaded = checkpoint.load_tensors(streamed)
    with safe_open(streamed, "pt") as f:
        for k, t in tensors.items():
            assert t.dtype == specs[k].dtype and tuple(t.shape) == specs[k].shape
            assert same_bits(f.get_tensor(k), t) and same_bits(loaded[k], t)
    assert tensors["b.scale_weight"].item() == 0.25 and (tensors["c.gamma"] == 1).all()
    assert not os.path.exists(streamed + ".partial")


def test_values_are_deterministic_per_key_and_sanely_scaled():
    specs = small_specs()
    one = stand_in_values.materialize(specs, 3)
    alone = stand_in_values.materialize({"d.weight": specs["d.weight"]}, 3)
    assert torch.equal(one["d.weight"], alone["d.weight"])  # independent of the other tensors
    assert not torch.equal(one["d.weight"], stand_in_values.materialize(specs, 4)["d.weight"])
    big = stand_in_values.spec("x.weight", (512, 1024), torch.float32)
    w = stand_in_values.materialize({"x.weight": big})["x.weight"]
    assert abs(w.std().item() * 1024 ** 0.5 - 1) < 0.02  # N(0, 1/fan_in)
    norm = stand_in_values.materialize({"n.weight": stand_in_values.spec("n.weight", (4096,),
                                                                        torch.bfloat16)})
    assert abs(norm["n.weight"].float().mean().item() - 1) < 0.01


@needs_comfy
def test_full_size_clip_vision_and_vae_load_through_comfyui(tmp_path):
    written = mt_stand_ins.write_full_size_stand_ins(
        str(tmp_path), ["clip_vision_h.safetensors", "wan_2.1_vae.safetensors"], log=lambda _: None)
    clip, vae = written["clip_vision_h.safetensors"], written["wan_2.1_vae.safetensors"]
    assert os.path.getsize(clip) > 1.26e9 and os.path.getsize(vae) > 0.25e9
    r = run_child("load", os.pathsep.join((clip, vae)))
    assert r["clip_missing"] == []
    assert r["vae_class"] == "comfy.ldm.wan.vae"  # the Wan 2.1 VAE, not 2.2
    assert r["latent"] == [1, 16, 2, 4, 4] and r["finite"]


def test_wav2vec2_folder_loads_through_our_encoder_and_patch_is_recognised(tmp_path):
    from wanvideo_infinitetalk.multitalk.inject import detect_infinitetalk
    from wanvideo_infinitetalk.multitalk.wav2vec2 import CHINESE_WAV2VEC2_BASE, load_wav2vec2

    written = mt_stand_ins.write_full_size_stand_ins(str(tmp_path), ["chinese-wav2vec2-base"],
                                                     log=lambda _: None)
    folder = written["chinese-wav2vec2-base"]
    assert folder == str(tmp_path / "wav2vec2" / "chinese-wav2vec2-base")
    encoder = load_wav2vec2(folder)
    assert encoder.config == CHINESE_WAV2VEC2_BASE
    found = detect_infinitetalk(mt_stand_ins.infinitetalk_patch_specs())
    assert found["keys_found"] == 330 and found["blocks"] == 40 and found["other_keys"] == 0


def test_lora_matches_every_target_of_the_14b_model_and_fp8_file_reads_as_fp8():
    from wanvideo_infinitetalk.wanvideo.lora import group_keys
    from wanvideo_infinitetalk.wanvideo.model import WanModel

    with torch.device("meta"):
        model = WanModel(stand_ins.WAN21_14B_I2V)
    groups, unmatched = group_keys(list(stand_ins.lora_specs()), model)
    assert unmatched == [] and len(groups) == 40 * 12
    fp8 = stand_ins.wan_transformer_specs(torch.float8_e4m3fn)
    found = detect_quantization(list(fp8), dtypes={k: s.dtype for k, s in fp8.items()})
    assert found["kind"] == "fp8" and found["counts"] == {"fp8_e4m3fn": 40 * 12}
