"""Loader-side nodes in a real ComfyUI over HTTP: InfiniteTalk Model Loader, WanVideo LoRA Select,
quantization on load, WanVideo BlockSwap, Wav2Vec2 Model Loader, InfiniteTalk Audio Embeds /
Audio Info; every wrong input answered by HTTP 400 node_errors or an execution_error that names
the problem, with the server healthy afterwards."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import wave

import pytest

import comfy_harness as h
import demo_assets

pytestmark = pytest.mark.comfy

I2V = "wan21_tiny_i2v.safetensors"
PATCH_1 = "infinitetalk_tiny_single.safetensors"
PATCH_2 = "infinitetalk_tiny_multi.safetensors"
LORA = "wan21_tiny_lora.safetensors"
FOREIGN_LORA = "not_wan_lora.safetensors"
W2V = "tiny-wav2vec2"
EMBEDS = "nodes_test_prompt.safetensors"
NEW_NODES = ("InfiniteTalkModelLoader", "WanVideoLoraSelect", "WanVideoBlockSwap",
             "Wav2Vec2ModelLoader", "InfiniteTalkAudioEmbeds", "InfiniteTalkAudioInfo")


def _speech_wav(path: str, text: str) -> str:
    """espeak-ng speech (scripts/setup.sh installs it); a modulated tone when it is missing."""
    exe = shutil.which("espeak-ng")
    if exe:
        subprocess.run([exe, "-w", path, text], check=True, capture_output=True, timeout=60)
        return "espeak-ng"
    demo_assets.tone_wav(path, 1.5)
    return "tone"


def _wav_seconds(path: str) -> float:
    with wave.open(path, "rb") as w:
        return w.getnframes() / w.getframerate()


@pytest.fixture(scope="module")
def env(comfy):
    """Inputs for this module in the shared server's base directory: speech WAVs, a too-short
    WAV, wrong-kind files in the loaders' folders, a portrait and text embeds for the sampler."""
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    if comfy.models_problem or not comfy.valid_model:
        from conftest import _skip_unless_ci

        _skip_unless_ci(comfy.models_problem or "no tiny diffusion model was written")
    base = comfy.base
    needed = [os.path.join(base, "models", "infinitetalk", PATCH_1),
              os.path.join(base, "models", "wav2vec2", W2V, "config.json"),
              os.path.join(base, "models", "loras", LORA)]
    missing = [p for p in needed if not os.path.exists(p)]
    assert not missing, f"tiny generator did not write {missing}"
    inp = os.path.join(base, "input")
    source = _speech_wav(os.path.join(inp, "nodes_speech_1.wav"), "Hello, this is a talking portrait.")
    _speech_wav(os.path.join(inp, "nodes_speech_2.wav"), "And I answer.")
    demo_assets.tone_wav(os.path.join(inp, "nodes_short.wav"), 0.02)
    models = os.path.join(base, "models")
    shutil.copy(os.path.join(models, "vae", h.TINY_VAE_NAME),
                os.path.join(models, "diffusion_models", "nodes_test_vae_copy.safetensors"))
    shutil.copy(os.path.join(models, "loras", LORA),
                os.path.join(models, "wav2vec2", "nodes_test_not_wav2vec2.safetensors"))
    g = torch.Generator().manual_seed(0)
    os.makedirs(os.path.join(models, "text_embeds"), exist_ok=True)
    save_file({"positive": torch.randn(1, 6, 4096, generator=g),
               "negative": torch.randn(1, 4, 4096, generator=g)},
              os.path.join(models, "text_embeds", EMBEDS),
              metadata={"format": "wanvideo_text_embeds", "version": "1"})
    img = (torch.rand(64, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(os.path.join(inp, "nodes_portrait.png"))
    return {"source": source, "seconds_1": _wav_seconds(os.path.join(inp, "nodes_speech_1.wav")),
            "seconds_2": _wav_seconds(os.path.join(inp, "nodes_speech_2.wav"))}


# ----------------------------------------------------------------------------- graphs

def loader_graph(model=I2V, patch=PATCH_1, loras=((LORA, 1.0),), quantization="none",
                 precision="fp32", load_device="offload_device", fp8_matmul=None) -> dict:
    g = {"1": {"class_type": "WanVideoModelLoader",
               "inputs": {"model": model, "base_precision": precision, "attention": "sdpa",
                          "load_device": load_device, "quantization": quantization}},
         "2": {"class_type": "WanVideoModelInfo", "inputs": {"model": ["1", 0]}}}
    if fp8_matmul is not None:
        g["1"]["inputs"]["fp8_matmul"] = fp8_matmul
    if patch:
        g["3"] = {"class_type": "InfiniteTalkModelLoader", "inputs": {"model": patch}}
        g["1"]["inputs"]["infinitetalk"] = ["3", 0]
    prev = None
    for i, (name, strength) in enumerate(loras):
        nid = str(10 + i)
        g[nid] = {"class_type": "WanVideoLoraSelect", "inputs": {"lora": name, "strength": strength}}
        if prev:
            g[nid]["inputs"]["prev_lora"] = [prev, 0]
        prev = nid
    if prev:
        g["1"]["inputs"]["lora"] = [prev, 0]
    return g


def audio_graph(audio="nodes_speech_1.wav", audio_2=None, mode="para", w2v=W2V, boxes="",
                masks=None) -> dict:
    g = {"1": {"class_type": "LoadAudio", "inputs": {"audio": audio}},
         "2": {"class_type": "Wav2Vec2ModelLoader", "inputs": {"model": w2v}},
         "3": {"class_type": "InfiniteTalkAudioEmbeds",
               "inputs": {"wav2vec2": ["2", 0], "audio": ["1", 0], "mode": mode,
                          "speaker_boxes": boxes}},
         "4": {"class_type": "InfiniteTalkAudioInfo", "inputs": {"audio_embeds": ["3", 0]}}}
    if audio_2:
        g["5"] = {"class_type": "LoadAudio", "inputs": {"audio": audio_2}}
        g["3"]["inputs"]["audio_2"] = ["5", 0]
    if masks:
        for i, (w, hgt) in enumerate(masks, start=1):
            g[f"6{i}"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": w, "height": hgt}}
            g["3"]["inputs"][f"mask_{i}"] = [f"6{i}", 0]
    return g


def sampler_graph(blocks_to_swap=None) -> dict:
    """Portrait + tiny VAE + text embeds + tiny I2V with the InfiniteTalk patch + speech through
    our audio nodes -> WanVideo InfiniteTalk Sampler (one 9-frame window, 1 step) -> PreviewImage."""
    g = {
        "m1": {"class_type": "InfiniteTalkModelLoader", "inputs": {"model": PATCH_1}},
        "m2": {"class_type": "WanVideoModelLoader",
               "inputs": {"model": I2V, "base_precision": "fp32", "attention": "sdpa",
                          "load_device": "offload_device", "infinitetalk": ["m1", 0]}},
        "a1": {"class_type": "LoadAudio", "inputs": {"audio": "nodes_speech_1.wav"}},
        "a2": {"class_type": "Wav2Vec2ModelLoader", "inputs": {"model": W2V}},
        "a3": {"class_type": "InfiniteTalkAudioEmbeds",
               "inputs": {"wav2vec2": ["a2", 0], "audio": ["a1", 0], "mode": "para"}},
        "s1": {"class_type": "LoadImage", "inputs": {"image": "nodes_portrait.png"}},
        "s2": {"class_type": "VAELoader", "inputs": {"vae_name": h.TINY_VAE_NAME}},
        "s3": {"class_type": "InfiniteTalkImageToVideo",
               "inputs": {"start_image": ["s1", 0], "vae": ["s2", 0], "width": 64, "height": 64,
                          "clip_length": 9, "motion_frames": 1}},
        "s4": {"class_type": "WanVideoLoadTextEmbeds", "inputs": {"embeds": EMBEDS}},
        "s5": {"class_type": "WanVideoInfiniteTalkSampler",
               "inputs": {"model": ["m2", 0], "positive": ["s4", 0], "negative": ["s4", 1],
                          "conditioning": ["s3", 0], "audio_embeds": ["a3", 0],
                          "vae": ["s2", 0], "steps": 1, "shift": 7.0, "text_guidance": 1.0,
                          "audio_guidance": 1.0, "scheduler": "euler", "seed": 1,
                          "color_correction": 0.0, "max_frames": 9}},
        "s6": {"class_type": "PreviewImage", "inputs": {"images": ["s5", 0]}},
    }
    if blocks_to_swap is not None:
        g["b1"] = {"class_type": "WanVideoBlockSwap",
                   "inputs": {"blocks_to_swap": blocks_to_swap, "prefetch": 1,
                              "offload_non_block": False, "pin_memory": True, "show_stats": True}}
        g["s5"]["inputs"]["block_swap_args"] = ["b1", 0]
    return g


def _json(entry: dict, node: str) -> dict:
    text = h.ui_output(entry, node)["text"]
    return json.loads(text[0] if isinstance(text, list) else text)


def _error(comfy, graph: dict) -> str:
    """The problem text of a graph that must fail: HTTP 400 node_errors or execution_error."""
    try:
        entry = comfy.wait(comfy.queue(graph), timeout=300)
    except h.PromptRejected as e:
        return json.dumps(e.node_errors) + " " + json.dumps(e.error)
    err = h.execution_error(entry)
    assert err is not None, f"expected a failure, got {entry['status']}"
    return err["exception_message"]


def _healthy(comfy) -> None:
    """A valid prompt right after a failure still succeeds."""
    entry = comfy.run(audio_graph(), timeout=300)
    assert _json(entry, "4")["speakers"] == 1


# ----------------------------------------------------------------------------- schemas

def _options(decl) -> list:
    """Combo choices: V3 declares ["COMBO", {"options": [...]}], classic nodes [[...], {...}]."""
    return decl[1]["options"] if decl[0] == "COMBO" else decl[0]


def test_new_nodes_are_registered_with_expected_sockets(comfy):
    info = comfy.object_info()
    for node in NEW_NODES:
        assert node in info, node
        assert info[node]["category"] == "WanVideo InfiniteTalk"
    assert info["InfiniteTalkModelLoader"]["output"] == ["INFINITETALK_PATCH"]
    assert info["WanVideoLoraSelect"]["output"] == ["WANVIDLORA"]
    assert info["WanVideoBlockSwap"]["output"] == ["BLOCKSWAPARGS"]
    assert info["Wav2Vec2ModelLoader"]["output"] == ["WAV2VEC2MODEL"]
    assert info["InfiniteTalkAudioEmbeds"]["output"] == ["INFINITETALK_AUDIO"]
    assert info["InfiniteTalkAudioInfo"]["output_node"] is True
    loader = info["WanVideoModelLoader"]["input"]
    assert loader["required"]["load_device"][1]["default"] == "offload_device"
    opt = loader["optional"]
    assert _options(opt["quantization"]) == ["none", "fp8_e4m3fn", "fp8_e4m3fn_scaled", "nvfp4"]
    assert "choose none" in opt["quantization"][1]["tooltip"]
    assert _options(opt["fp8_matmul"]) == ["fast", "accurate", "dequantize"]
    assert opt["fp8_matmul"][1]["default"] == "fast" and "fp32" in opt["fp8_matmul"][1]["tooltip"]
    assert opt["infinitetalk"][0] == "INFINITETALK_PATCH" and opt["lora"][0] == "WANVIDLORA"
    swap = info["WanVideoBlockSwap"]["input"]["required"]
    assert list(swap) == ["blocks_to_swap", "prefetch", "offload_non_block", "pin_memory",
                          "show_stats"]
    assert swap["blocks_to_swap"][1]["min"] == -1 and swap["pin_memory"][1]["default"] is True
    assert "3-7x" in swap["pin_memory"][1]["tooltip"]
    assert "lightx2v" in info["WanVideoLoraSelect"]["input"]["required"]["lora"][1]["tooltip"]
    patches = _options(info["InfiniteTalkModelLoader"]["input"]["required"]["model"])
    assert PATCH_1 in patches and I2V in patches  # own folder plus diffusion_models
    w2v = _options(info["Wav2Vec2ModelLoader"]["input"]["required"]["model"])
    assert W2V in w2v


# ----------------------------------------------------------------------------- model loader

def test_loader_with_patch_lora_and_quantization(comfy, env):
    entry = comfy.run(loader_graph(quantization="fp8_e4m3fn_scaled", fp8_matmul="accurate"),
                      timeout=300)
    report = _json(entry, "2")
    it = report["infinitetalk"]
    assert it and it.get("blocks_patched") == report["config"]["num_layers"], it
    assert [r["name"] for r in report["loras"]] == [LORA]
    assert report["loras"][0]["merged"], report["loras"]
    assert report["quantization"]["kind"] == "fp8_e4m3fn_scaled"
    assert report["quantization"]["source"] == "quantized on load"
    assert report["layout_violations"] == []
    log = comfy.log_text()
    assert "InfiniteTalk Model Loader: " + PATCH_1 in log
    assert "quantization=fp8_e4m3fn_scaled" in log and LORA in log
    assert "fp8_matmul=accurate" in log
    assert "  attention: PyTorch SDPA" in log   # the loader's default backend, said in words


def test_two_chained_loras_merge_in_order(comfy, env):
    entry = comfy.run(loader_graph(loras=((LORA, 0.5), (LORA, -0.5))), timeout=300)
    report = _json(entry, "2")
    assert [(r["name"], r["strength"]) for r in report["loras"]] == [(LORA, 0.5), (LORA, -0.5)]


@pytest.mark.parametrize("case", ["vae_as_model", "wan_as_patch", "foreign_lora",
                                  "quantize_prequantized", "unknown_patch_name", "bad_fp8_matmul"])
def test_loader_wrong_files_fail_cleanly(comfy, env, case):
    if case == "vae_as_model":
        name = "nodes_test_vae_copy.safetensors"
        msg, want = _error(comfy, loader_graph(model=name, patch=None, loras=())), [name]
    elif case == "wan_as_patch":
        msg, want = _error(comfy, loader_graph(patch=I2V, loras=())), \
            [I2V, "without InfiniteTalk layers"]
    elif case == "foreign_lora":
        msg, want = _error(comfy, loader_graph(patch=None, loras=((FOREIGN_LORA, 1.0),))), \
            [FOREIGN_LORA, "another model"]
    elif case == "quantize_prequantized":
        name = "wan21_tiny_i2v_fp8_e4m3fn.safetensors"
        msg, want = _error(comfy, loader_graph(model=name, patch=None, loras=(),
                                               quantization="fp8_e4m3fn_scaled")), \
            [name, "already quantized", "none"]
    elif case == "bad_fp8_matmul":
        msg, want = _error(comfy, loader_graph(patch=None, loras=(), fp8_matmul="turbo")), \
            ["fp8_matmul", "'turbo'", "accurate"]
    else:
        msg, want = _error(comfy, loader_graph(patch="no_such_patch.safetensors")), \
            ["no_such_patch.safetensors", "is not a file in models/infinitetalk"]
    for text in want:
        assert text in msg, (case, msg)
    _healthy(comfy)


# ----------------------------------------------------------------------------- audio

def test_audio_embeds_one_speaker(comfy, env):
    entry = comfy.run(audio_graph(), timeout=300)
    info = _json(entry, "4")
    frames = int(env["seconds_1"] * 25)
    assert info["speakers"] == 1 and info["masks"] is None
    assert info["frames"] == frames, (info, env)
    assert info["features"][0][:2] == [frames, 12]
    assert abs(info["audio"]["seconds"] - env["seconds_1"]) < 1e-3   # the original audio
    assert "InfiniteTalk Audio Embeds: 1 speaker(s)" in comfy.log_text()


@pytest.mark.parametrize("mode", ["para", "add"])
def test_audio_embeds_two_speakers(comfy, env, mode):
    entry = comfy.run(audio_graph(audio_2="nodes_speech_2.wav", mode=mode,
                                  boxes="0,0,0.5,1; 0.5,0,1,1"), timeout=300)
    info = _json(entry, "4")
    s1, s2 = env["seconds_1"], env["seconds_2"]
    seconds = max(s1, s2) if mode == "para" else s1 + s2
    assert info["speakers"] == 2 and info["masks"][0] == 2
    assert abs(info["frames"] - int(seconds * 25)) <= 1, (info, s1, s2)
    assert info["features"][0] == info["features"][1]
    assert info["audio"]["sample_rate"] == 16000
    assert abs(info["audio"]["seconds"] - seconds) < 0.05


def test_audio_embeds_two_speakers_with_masks(comfy, env):
    entry = comfy.run(audio_graph(audio_2="nodes_speech_2.wav", masks=[(48, 32), (48, 32)]),
                      timeout=300)
    assert _json(entry, "4")["masks"] == [2, 32, 48]


@pytest.mark.parametrize("case", ["short_audio", "two_speakers_one_audio", "mask_sizes",
                                  "one_mask", "bad_boxes", "not_wav2vec2", "unknown_wav2vec2"])
def test_audio_bad_inputs_fail_cleanly(comfy, env, case):
    graphs = {
        "short_audio": (audio_graph(audio="nodes_short.wav"), ["0.02", "one video frame"]),
        "two_speakers_one_audio": (audio_graph(boxes="0,0,0.5,1; 0.5,0,1,1"),
                                   ["two-speaker mode needs two audio inputs"]),
        "mask_sizes": (audio_graph(audio_2="nodes_speech_2.wav", masks=[(48, 32), (32, 32)]),
                       ["differ in size"]),
        "one_mask": (audio_graph(audio_2="nodes_speech_2.wav", masks=[(48, 32)]),
                     ["both mask_1 and mask_2"]),
        "bad_boxes": (audio_graph(audio_2="nodes_speech_2.wav", boxes="0,0,2,1"),
                      ["speaker_boxes", "fractions"]),
        "not_wav2vec2": (audio_graph(w2v="nodes_test_not_wav2vec2.safetensors"),
                         ["nodes_test_not_wav2vec2.safetensors", "not a usable wav2vec2"]),
        "unknown_wav2vec2": (audio_graph(w2v="nope"), ["'nope'", "models/wav2vec2"]),
    }
    graph, want = graphs[case]
    msg = _error(comfy, graph)
    for text in want:
        assert text in msg, (case, msg)
    _healthy(comfy)


# ----------------------------------------------------------------------------- sampler + BlockSwap

def test_blockswap_node_feeds_the_sampler(comfy, env):
    entry = comfy.run(sampler_graph(blocks_to_swap=1), timeout=600)
    assert entry["status"]["status_str"] == "success"
    assert h.ui_output(entry, "s6")["images"], entry["outputs"]


def test_blocks_to_swap_larger_than_the_model(comfy, env):
    msg = _error(comfy, sampler_graph(blocks_to_swap=99))
    assert "99" in msg and "2 blocks" in msg, msg
    _healthy(comfy)
