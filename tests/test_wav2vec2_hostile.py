"""Broken wav2vec2 folders, files and audio: each is refused with an error naming what is wrong."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from wanvideo_infinitetalk.multitalk import audio_features as af
from wanvideo_infinitetalk.multitalk import tiny
from wanvideo_infinitetalk.multitalk import wav2vec2 as w2v
from wanvideo_infinitetalk.wanvideo import placement

FOLDER = "chinese-w2v-test"


@pytest.fixture
def folder(tmp_path):
    return tiny.write_tiny_wav2vec2(str(tmp_path / FOLDER), seed=2)


def _edit_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _edit_weights(folder, fn):
    path = os.path.join(folder, "model.safetensors")
    sd = load_file(path)
    fn(sd)
    save_file({k: v.contiguous() for k, v in sd.items()}, path)


def _refused(path, exc_type, *names):
    with pytest.raises(exc_type) as info:
        w2v.load_wav2vec2(path)
    for name in names:
        assert name in str(info.value)
    return str(info.value)


def test_valid_folder_loads_and_unknown_config_keys_are_ignored(folder):
    _edit_config(folder, some_future_option={"x": 1}, vocab_size=32)
    model = w2v.load_wav2vec2(folder)
    assert model.config.hidden_size == 32 and model.source == FOLDER


@pytest.mark.parametrize("text", ["{\"hidden_size\": 32,", "", "\xff\xfe"])
def test_config_not_json(folder, text):
    with open(os.path.join(folder, "config.json"), "w", encoding="latin-1") as f:
        f.write(text)
    msg = _refused(folder, w2v.Wav2Vec2Error, os.path.join(FOLDER, "config.json"), "not valid JSON")
    assert msg.startswith(os.path.join(FOLDER, "config.json"))


def test_config_not_an_object(folder):
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump([1, 2, 3], f)
    _refused(folder, ValueError, "config.json", FOLDER, "JSON object")


@pytest.mark.parametrize("changes,words", [
    ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer"),
    ({"num_attention_heads": 5}, "not divisible by num_attention_heads 5"),
    ({"hidden_size": "32"}, "hidden_size must be a positive integer"),
    ({"num_hidden_layers": 2.5}, "num_hidden_layers must be a positive integer"),
    ({"intermediate_size": True}, "intermediate_size must be a positive integer"),
    ({"conv_dim": "512"}, "conv_dim must be a non-empty list"),
    ({"conv_dim": [32, 32, -32, 32, 32, 32, 32]}, "conv_dim must be a non-empty list"),
    ({"conv_dim": [32] * 6}, "must have the same length, got 6, 7, 7"),
    ({"conv_kernel": []}, "conv_kernel must be a non-empty list"),
    ({"conv_stride": [[5], 2, 2, 2, 2, 2, 2]}, "conv_stride must be a non-empty list"),
    ({"hidden_act": "mish2"}, "hidden_act 'mish2' is not supported"),
    ({"feat_extract_activation": ["gelu"]}, "feat_extract_activation ('gelu',) is not supported"),
    ({"feat_extract_norm": "batch"}, "feat_extract_norm 'batch'"),
    ({"num_conv_pos_embeddings": 0}, "num_conv_pos_embeddings must be a positive integer"),
    ({"num_conv_pos_embedding_groups": 3}, "not divisible by num_conv_pos_embedding_groups 3"),
    ({"layer_norm_eps": -1}, "layer_norm_eps must be a positive number"),
    ({"do_stable_layer_norm": "yes"}, "must be true or false"),
])
def test_config_values_are_validated(folder, changes, words):
    _edit_config(folder, **changes)
    msg = _refused(folder, w2v.Wav2Vec2Error, words)
    assert msg.startswith(os.path.join(FOLDER, "config.json") + ": ")


def test_config_that_does_not_match_the_weights(folder):
    _edit_config(folder, hidden_size=64, intermediate_size=128)
    msg = _refused(folder, ValueError, "model.safetensors", "[32, 32]", "[64, 32]")
    assert "'feature_projection.projection.weight'" in msg  # the first tensor whose shape differs


def test_weights_missing_a_key(folder):
    _edit_weights(folder, lambda sd: sd.pop("encoder.layers.3.attention.k_proj.weight"))
    _refused(folder, ValueError, "model.safetensors", "encoder.layers.3.attention.k_proj.weight")


def test_weights_of_the_wrong_shape(folder):
    def shrink(sd):
        sd["encoder.layers.5.feed_forward.output_dense.weight"] = torch.zeros(32, 63)
    _edit_weights(folder, shrink)
    _refused(folder, ValueError, "model.safetensors", "encoder.layers.5.feed_forward.output_dense.weight",
             "[32, 63]", "[32, 64]")


def test_integer_weights(folder):
    def to_int(sd):
        sd["encoder.layer_norm.bias"] = torch.zeros(32, dtype=torch.int32)
    _edit_weights(folder, to_int)
    _refused(folder, ValueError, "model.safetensors", "encoder.layer_norm.bias", "floating point")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight(folder, value):
    def poison(sd):
        sd["encoder.layers.7.attention.q_proj.weight"][3, 4] = value
    _edit_weights(folder, poison)
    _refused(folder, ValueError, "model.safetensors", "NaN/Inf")


def test_truncated_safetensors(folder):
    path = os.path.join(folder, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    _refused(folder, ValueError, "model.safetensors")


def test_bare_file_that_is_not_wav2vec2(tmp_path):
    path = str(tmp_path / "lora.safetensors")
    save_file({"lora_A.weight": torch.zeros(4, 8)}, path)
    _refused(path, ValueError, "lora.safetensors", "not a wav2vec2 model")


def test_empty_folder_and_missing_path(tmp_path):
    empty = tmp_path / "empty-w2v"
    empty.mkdir()
    msg = _refused(str(empty), FileNotFoundError, "empty-w2v", "model.safetensors")
    assert msg.startswith("empty-w2v: ")
    _refused(str(tmp_path / "nowhere"), FileNotFoundError, "nowhere")


def _as_bin(folder):
    sd = load_file(os.path.join(folder, "model.safetensors"))
    os.remove(os.path.join(folder, "model.safetensors"))
    torch.save(sd, os.path.join(folder, "pytorch_model.bin"))


def test_bin_weights_load_on_current_torch(folder):
    _as_bin(folder)
    assert w2v.load_wav2vec2(folder).config.num_hidden_layers == 12


def test_bin_weights_refused_before_torch_2_6(folder, monkeypatch):
    _as_bin(folder)
    monkeypatch.setattr(w2v, "torch_version", lambda: (2, 5))
    _refused(folder, ValueError, "pytorch_model.bin", "torch >= 2.6", "safetensors")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_corrupt_bin(folder):
    _as_bin(folder)
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not really a pickle")
    _refused(folder, ValueError, "pytorch_model.bin", "not readable")


def test_broken_encoder_weights_give_non_finite_features(folder):
    model = w2v.load_wav2vec2(folder)
    w = model.encoder.layers[4].feed_forward.output_dense.bias.clone()
    w[0] = float("inf")
    placement.set_tensor(model, "encoder.layers.4.feed_forward.output_dense.bias", w)
    with pytest.raises(ValueError, match=rf"^{FOLDER}: wav2vec2 features have \d+ NaN/Inf values"):
        af.wav2vec_features(model, np.zeros(16000, np.float32) + 0.01)


def test_nan_audio():
    wave = torch.zeros(1, 16000 * 2)
    wave[0, 8320:8420] = float("nan")  # 100 samples from 0.52 s
    with pytest.raises(ValueError, match=r"^audio has 100 NaN/Inf samples \(first at 0\.52 s\)"):
        af.prepare_speech(wave, 16000)


def test_inf_audio_in_one_channel_of_a_batch():
    wave = torch.zeros(1, 2, 48000)
    wave[0, 1, 24000] = float("inf")
    wave[0, 0, 30000:30002] = float("-inf")
    with pytest.raises(ValueError, match=r"audio has 3 NaN/Inf samples \(first at 0\.50 s\)"):
        af.prepare_speech(wave, 48000)
    with pytest.raises(ValueError, match=r"first at sample 24000"):
        af.to_mono(wave)


def test_silent_audio_is_fine(folder):
    feats = af.audio_features(w2v.load_wav2vec2(folder), torch.zeros(1, 16000), 16000)
    assert feats.shape == (25, 12, 32) and torch.isfinite(feats).all()
