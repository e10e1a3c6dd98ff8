"""Hostile and broken inputs against a real ComfyUI server with the pack (CPU, tiny models).

Every case must end in a clear refusal: HTTP 400 from validation or an execution_error whose text
names the file, input or value; no case may hang (each runs under a timeout), /system_stats must
answer afterwards, and a valid prompt must still succeed. File inputs get absolute paths,
traversal, names from other folders and FIFOs: none of them may be opened (a FIFO would block the
server for good, an outside file would be merged), and the refusal reads the same whether or not
the named path exists.
"""
from __future__ import annotations

import json
import os
import random
import shutil

import numpy as np
import pytest

import comfy_harness as h
import graph_nodes as gn
import hostile_files as hf

pytestmark = pytest.mark.comfy

I2V = "wan21_tiny_i2v.safetensors"
T2V = "wan21_tiny_t2v.safetensors"
PATCH = "infinitetalk_tiny_single.safetensors"
LORA = "wan21_tiny_lora.safetensors"
W2V = "hostile_w2v_768"
TINY_W2V = "tiny-wav2vec2"        # as wide as the tiny InfiniteTalk patch reads
EMBEDS = "hostile_prompt.safetensors"
CASE_TIMEOUT = 120


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Own server: the FIFOs and broken files below must not leak into other suites' folders."""
    if not os.path.isfile(os.path.join(h.COMFY_DIR, "main.py")):
        from conftest import _skip_unless_ci

        _skip_unless_ci("ComfyUI is not extracted: run `make setup`")
    base = str(tmp_path_factory.mktemp("hostile_base"))
    outside = str(tmp_path_factory.mktemp("outside_models"))
    models, problem = h.prepare_base(base)
    assert problem is None, problem
    paths = _write_inputs(base, outside)
    server = h.ComfyServer(base).start()
    client = h.ComfyClient(server)
    client.base, client.paths = base, paths
    try:
        assert server.import_problems() == [], server.log_text()[-4000:]
        yield client
    finally:
        client.close()
        server.stop()


def _write_inputs(base: str, outside: str) -> dict:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    from wanvideo_infinitetalk.multitalk import tiny

    m = os.path.join(base, "models")
    dm, lo, it, wv, te = (os.path.join(m, d) for d in
                          ("diffusion_models", "loras", "infinitetalk", "wav2vec2", "text_embeds"))
    for d in (dm, lo, it, wv, te):
        os.makedirs(d, exist_ok=True)
    p = {"outside_lora": os.path.join(outside, "outside_lora.safetensors")}
    shutil.copy(os.path.join(lo, LORA), p["outside_lora"])
    for name, (header, data) in hf.HEADER_CASES.items():
        hf.raw_safetensors(os.path.join(dm, f"hdr_{name}.safetensors"), header, data)
    hf.header_beyond_file(os.path.join(dm, "hdr_header_beyond_file.safetensors"))
    for name in ("shard-00001-of-00000.safetensors", "shard-00001-of-99999.safetensors"):
        shutil.copy(os.path.join(dm, I2V), os.path.join(dm, name))
    p["nan_key"] = hf.poisoned_copy(os.path.join(dm, I2V), os.path.join(dm, "nan_weight.safetensors"))
    hf.poisoned_copy(os.path.join(dm, I2V), os.path.join(dm, "inf_weight.safetensors"), float("inf"))
    hf.poisoned_copy(os.path.join(it, PATCH), os.path.join(it, "nan_patch.safetensors"))
    hf.poisoned_copy(os.path.join(lo, LORA), os.path.join(lo, "nan_lora.safetensors"))
    lora = {k: v for k, v in _load(os.path.join(lo, LORA)).items()}
    down = next(k for k in lora if k.endswith("lora_down.weight"))
    stem = down[:-len(".lora_down.weight")]
    save_file({down: torch.zeros(0, lora[down].shape[1]),
               stem + ".lora_up.weight": torch.zeros(lora[stem + ".lora_up.weight"].shape[0], 0)},
              os.path.join(lo, "rank0_lora.safetensors"))
    save_file({down: torch.zeros(4, 7), stem + ".lora_up.weight": torch.zeros(5, 4)},
              os.path.join(lo, "wrong_shape_lora.safetensors"))
    tiny.write_tiny_wav2vec2(os.path.join(wv, W2V), hidden=768)
    for name, change in (("w2v_zero_heads", {"num_attention_heads": 0}),
                         ("w2v_bad_conv_dim", {"conv_dim": "512"})):
        shutil.copytree(os.path.join(wv, W2V), os.path.join(wv, name))
        cfg_path = os.path.join(wv, name, "config.json")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cfg.update(change)
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
    os.makedirs(os.path.join(wv, "w2v_nan"), exist_ok=True)
    shutil.copy(os.path.join(wv, W2V, "config.json"), os.path.join(wv, "w2v_nan", "config.json"))
    hf.poisoned_copy(os.path.join(wv, W2V, "model.safetensors"),
                     os.path.join(wv, "w2v_nan", "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    embeds = {"positive": torch.randn(1, 6, 4096, generator=g),
              "negative": torch.randn(1, 4, 4096, generator=g)}
    meta = {"format": "wanvideo_text_embeds", "version": "1"}
    save_file(embeds, os.path.join(te, EMBEDS), metadata=meta)
    embeds["negative"][0, 0, 0] = float("nan")
    save_file(embeds, os.path.join(te, "nan_embeds.safetensors"), metadata=meta)
    for folder, name in ((dm, "fifo.safetensors"), (lo, "fifo_lora.safetensors"),
                         (it, "fifo_patch.safetensors"), (wv, "fifo_w2v.safetensors"),
                         (te, "fifo_embeds.safetensors")):
        p["fifo:" + name] = hf.fifo(os.path.join(folder, name))
    inp = os.path.join(base, "input")
    speech = hf.speech_like(2.0)
    hf.float_wav(os.path.join(inp, "speech.wav"), speech)
    bad = speech.copy()
    bad[8000:8100] = np.nan
    hf.float_wav(os.path.join(inp, "nan_speech.wav"), bad)
    bad = speech.copy()
    bad[100] = np.inf
    hf.float_wav(os.path.join(inp, "inf_speech.wav"), bad)
    img = (torch.rand(48, 64, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(os.path.join(inp, "portrait.png"))
    return p


def _load(path):
    from safetensors.torch import load_file

    return load_file(path)


# ----------------------------------------------------------------------------- graphs

def loader(model=I2V, lora=None, patch=None, extra=None) -> dict:
    g = {"1": {"class_type": "WanVideoModelLoader",
               "inputs": {"model": model, "base_precision": "fp32", "attention": "sdpa",
                          "load_device": "main_device"}},
         "2": {"class_type": "WanVideoModelInfo", "inputs": {"model": ["1", 0]}}}
    if lora is not None:
        g["1"]["inputs"]["lora"] = lora
    if patch is not None:
        g["1"]["inputs"]["infinitetalk"] = patch
    g.update(extra or {})
    return g


def lora_select(name, strength=1.0, prev=None) -> dict:
    g = loader(lora=["3", 0])
    g["3"] = {"class_type": "WanVideoLoraSelect", "inputs": {"lora": name, "strength": strength}}
    if prev is not None:
        g["3"]["inputs"]["prev_lora"] = prev
    return g


def patch_loader(name) -> dict:
    g = loader(patch=["3", 0])
    g["3"] = {"class_type": "InfiniteTalkModelLoader", "inputs": {"model": name}}
    return g


def audio(wav="speech.wav", w2v=W2V, boxes="", audio_2=None, masks=None) -> dict:
    g = {"1": {"class_type": "LoadAudio", "inputs": {"audio": wav}},
         "2": {"class_type": "Wav2Vec2ModelLoader", "inputs": {"model": w2v}},
         "3": {"class_type": "InfiniteTalkAudioEmbeds",
               "inputs": {"wav2vec2": ["2", 0], "audio": ["1", 0], "mode": "para",
                          "speaker_boxes": boxes}},
         "4": {"class_type": "InfiniteTalkAudioInfo", "inputs": {"audio_embeds": ["3", 0]}}}
    if audio_2:
        g["5"] = {"class_type": "LoadAudio", "inputs": {"audio": audio_2}}
        g["3"]["inputs"]["audio_2"] = ["5", 0]
    for i, (w, hh, value) in enumerate(masks or (), start=1):
        g[f"6{i}"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": w, "height": hh}}
        g["3"]["inputs"][f"mask_{i}"] = [f"6{i}", 0]
    return g


def embeds(name) -> dict:
    return {"1": {"class_type": "WanVideoLoadTextEmbeds", "inputs": {"embeds": name}},
            "2": {"class_type": "WanVideoSaveTextEmbeds",
                  "inputs": {"positive": ["1", 0], "negative": ["1", 1],
                             "filename_prefix": f"copy_{random.randrange(10 ** 9)}"}}}


def save_embeds(prefix) -> dict:
    g = embeds(EMBEDS)
    g["2"]["inputs"]["filename_prefix"] = prefix
    return g


def sampler(model=I2V, patch=PATCH, wav="speech.wav", width=64, height=48, clip=9, motion=1,
            steps=1, shift=7.0, guidance=1.0, te=EMBEDS, w2v=TINY_W2V, **audio_kw) -> dict:
    g = {k: v for k, v in audio(wav, w2v=w2v, **audio_kw).items() if k != "4"}
    g.update({
        "10": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
        "11": {"class_type": "VAELoader", "inputs": {"vae_name": h.TINY_VAE_NAME}},
        "12": gn.image_to_video(["10", 0], ["11", 0], width, height, clip, motion),
        "13": {"class_type": "WanVideoLoadTextEmbeds", "inputs": {"embeds": te}},
        "14": gn.model_loader(model, infinitetalk=["15", 0]),
        "15": {"class_type": "InfiniteTalkModelLoader", "inputs": {"model": patch}},
        "16": gn.sampler(["14", 0], ["13", 0], ["13", 1], ["12", 0], ["3", 0], ["11", 0],
                         steps=steps, seed=random.randrange(10 ** 6), shift=shift,
                         text_guidance=guidance, audio_guidance=guidance),
        "17": {"class_type": "PreviewImage", "inputs": {"images": ["16", 0]}},
    })
    return g


def dubbing(source_value) -> dict:
    """The sampler graph with the dubbing node in place of the image one, its source_video
    typed into the prompt (a path or a dict) instead of linked to LoadVideo."""
    g = sampler()
    g["12"] = gn.node("InfiniteTalkVideoToVideo", vae=["11", 0], source_fps=25.0, width=64,
                      height=48, clip_length=9, motion_frames=1, past_end="freeze",
                      color_reference="source_frame_0")
    if source_value is not None:
        g["12"]["inputs"]["source_video"] = {"__value__": source_value}
    return g


# ----------------------------------------------------------------------------- cases
# name -> (graph builder, words the refusal must contain). A builder gets the env client.

NOT_A_FILE = "is not a file in"
TRAVERSAL = ["/etc/passwd", "../../../../etc/passwd", "..\\..\\secrets.safetensors",
             "does_not_exist.safetensors", "a" * 5000]
_abs = lambda e: e.paths["outside_lora"]                    # noqa: E731  an existing outside file
_missing = lambda e: e.paths["outside_lora"] + ".missing"   # noqa: E731  a non-existing one

CASES: dict = {}
for i, name in enumerate(TRAVERSAL):
    CASES[f"model_name_{i}"] = (lambda e, n=name: loader(model=n), [NOT_A_FILE])
    CASES[f"lora_name_{i}"] = (lambda e, n=name: lora_select(n), [NOT_A_FILE])
    CASES[f"patch_name_{i}"] = (lambda e, n=name: patch_loader(n), [NOT_A_FILE])
    CASES[f"w2v_name_{i}"] = (lambda e, n=name: audio(w2v=n), [NOT_A_FILE])
    CASES[f"embeds_name_{i}"] = (lambda e, n=name: embeds(n), [NOT_A_FILE])
for label, target in (("outside_existing", _abs), ("outside_missing", _missing)):
    CASES[f"model_{label}"] = (lambda e, t=target: loader(model=t(e)), [NOT_A_FILE])
    CASES[f"lora_select_{label}"] = (lambda e, t=target: lora_select(t(e)), [NOT_A_FILE])
    CASES[f"lora_literal_{label}"] = (
        lambda e, t=target: loader(lora={"__value__": [[t(e), 1.0]]}), [NOT_A_FILE])
    CASES[f"prev_lora_literal_{label}"] = (
        lambda e, t=target: lora_select(LORA, prev={"__value__": [[t(e), 1.0]]}), [NOT_A_FILE])
    CASES[f"patch_literal_{label}"] = (
        lambda e, t=target: loader(patch={"path": t(e), "name": t(e)}), ["infinitetalk"])
    CASES[f"w2v_{label}"] = (lambda e, t=target: audio(w2v=t(e)), [NOT_A_FILE])
    CASES[f"embeds_{label}"] = (lambda e, t=target: embeds(t(e)), [NOT_A_FILE])
for name, builder in (("fifo.safetensors", loader), ("fifo_lora.safetensors", lora_select),
                      ("fifo_patch.safetensors", patch_loader),
                      ("fifo_embeds.safetensors", embeds)):
    CASES[f"fifo_{name}"] = (lambda e, n=name, b=builder: b(n), [NOT_A_FILE])
CASES["fifo_w2v"] = (lambda e: audio(w2v="fifo_w2v.safetensors"), [NOT_A_FILE])
CASES["fifo_lora_literal"] = (lambda e: loader(lora={"__value__": [["fifo_lora.safetensors", 1.0]]}),
                              [NOT_A_FILE])
CASES.update({
    "lora_literal_string": (lambda e: loader(lora="wan21_tiny_lora.safetensors"), ["lora"]),
    "lora_literal_nan_strength": (lambda e: loader(lora={"__value__": [[LORA, float("nan")]]}),
                                  ["finite"]),
    "lora_literal_junk": (lambda e: loader(lora={"__value__": [[1, 2, 3]]}), ["lora"]),
    "patch_literal_string": (lambda e: loader(patch="/etc/passwd"), ["infinitetalk"]),
    "save_embeds_traversal": (lambda e: save_embeds("../../../escape"), ["inside"]),
    "save_embeds_absolute": (lambda e: save_embeds("/tmp/escape"), ["inside"]),
    "shard_count_zero": (lambda e: loader(model="shard-00001-of-00000.safetensors"),
                         ["shard-00001-of-00000.safetensors"]),
    "shard_count_huge": (lambda e: loader(model="shard-00001-of-99999.safetensors"),
                         ["shard-00001-of-99999.safetensors"]),
    "nan_weight": (lambda e: loader(model="nan_weight.safetensors"),
                   ["nan_weight.safetensors", "NaN"]),
    "inf_weight": (lambda e: loader(model="inf_weight.safetensors"),
                   ["inf_weight.safetensors", "NaN/Inf"]),
    "nan_patch": (lambda e: patch_loader("nan_patch.safetensors"), ["nan_patch.safetensors", "NaN"]),
    "nan_lora": (lambda e: lora_select("nan_lora.safetensors"), ["nan_lora.safetensors", "NaN"]),
    "rank0_lora": (lambda e: lora_select("rank0_lora.safetensors"), ["rank0_lora.safetensors"]),
    "wrong_shape_lora": (lambda e: lora_select("wrong_shape_lora.safetensors"),
                         ["wrong_shape_lora.safetensors"]),
    "w2v_zero_heads": (lambda e: audio(w2v="w2v_zero_heads"), ["w2v_zero_heads"]),
    "w2v_bad_conv_dim": (lambda e: audio(w2v="w2v_bad_conv_dim"), ["w2v_bad_conv_dim", "conv_dim"]),
    "w2v_nan_weight": (lambda e: audio(w2v="w2v_nan"), ["w2v_nan", "NaN"]),
    "nan_embeds": (lambda e: embeds("nan_embeds.safetensors"), ["nan_embeds.safetensors", "NaN"]),
    "nan_audio": (lambda e: audio(wav="nan_speech.wav"), ["audio", "NaN"]),
    "inf_audio": (lambda e: audio(wav="inf_speech.wav"), ["audio", "NaN/Inf"]),
    "boxes_nan": (lambda e: audio(audio_2="speech.wav", boxes="nan,0,1,1; 0,0,1,1"),
                  ["speaker_boxes"]),
    "boxes_one": (lambda e: audio(audio_2="speech.wav", boxes="0,0,0.5,1"), ["two boxes"]),
    "empty_mask": (lambda e: audio(audio_2="speech.wav", masks=((64, 48, 0.0), (64, 48, 1.0))),
                   ["mask_1", "empty"]),
    "masks_differ": (lambda e: audio(audio_2="speech.wav", masks=((64, 48, 1.0), (32, 48, 1.0))),
                     ["differ"]),
    "width_huge": (lambda e: sampler(width=100000), ["width"]),
    "height_tiny": (lambda e: sampler(height=8), ["height"]),
    "clip_huge": (lambda e: sampler(clip=100001), ["clip_length"]),
    "steps_zero": (lambda e: sampler(steps=0), ["steps"]),
    "width_not_16": (lambda e: sampler(width=70), ["multiple of 16"]),
    "clip_not_4n1": (lambda e: sampler(clip=10), ["4n+1"]),
    "huge_video_memory": (lambda e: sampler(width=4096, height=4096, clip=257),
                          ["needs about", "GB available"]),
    "shift_nan": (lambda e: sampler(shift=float("nan")), ["shift", "finite"]),
    "t2v_with_patch": (lambda e: sampler(model=T2V), ["T2V", "image-to-video"]),
    "dub_literal_path": (lambda e: dubbing(_abs(e)), ["source_video", "VIDEO"]),
    "dub_literal_dict": (lambda e: dubbing({"file": _abs(e)}), ["source_video", "VIDEO"]),
    "dub_no_source": (lambda e: dubbing(None), ["exactly one source"]),
    "w2v_wrong_width": (lambda e: sampler(w2v=W2V), ["audio features", "chinese-wav2vec2-base"]),
})
for name in list(hf.HEADER_CASES) + ["header_beyond_file"]:
    CASES[f"header_{name}"] = (lambda e, n=name: loader(model=f"hdr_{n}.safetensors"),
                               [f"hdr_{name}.safetensors"])


def _refusal(env, graph: dict) -> tuple[str, str]:
    """('rejected', node_errors text) for HTTP 400, ('failed', exception text) for an
    execution_error; fails on success or on a timeout (a hang)."""
    try:
        pid = env.queue(graph)
    except h.PromptRejected as e:
        return "rejected", json.dumps(e.node_errors) + " " + json.dumps(e.error)
    entry = env.wait(pid, timeout=CASE_TIMEOUT)
    err = h.execution_error(entry)
    assert err is not None, f"expected a refusal, got {entry['status']}"
    return "failed", err["exception_message"]


def _healthy(env) -> None:
    """The server answers and runs a valid prompt (made unique so ComfyUI really executes it)."""
    stats = env.get("/system_stats")
    assert "system" in stats, stats
    g = loader()
    g["5"] = {"class_type": "EmptyImage", "inputs": {"width": random.randrange(8, 64), "height": 8,
                                                      "batch_size": 1, "color": 0}}
    g["6"] = {"class_type": "PreviewImage", "inputs": {"images": ["5", 0]}}
    entry = env.run(g, timeout=CASE_TIMEOUT)
    text = h.ui_output(entry, "2")["text"]
    info = json.loads(text[0] if isinstance(text, list) else text)
    assert info["model_type"] == "i2v"


@pytest.mark.timeout(CASE_TIMEOUT * 3)
@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_refused_clearly(env, case):
    builder, words = CASES[case]
    kind, text = _refusal(env, builder(env))
    for word in words:
        assert word in text, (case, kind, text[:2000])
    assert len(text) < 20_000, (case, len(text))      # no multi-megabyte error messages
    assert "Traceback" not in text
    _healthy(env)


def test_refusals_do_not_reveal_whether_a_path_exists(env):
    """Same text for an existing and a missing outside file, apart from the name itself."""
    import re

    texts = []
    for target in (_abs(env), _missing(env)):
        _, text = _refusal(env, loader(lora={"__value__": [[target, 1.0]]}))
        texts.append(re.sub(r"'[^']*'", "NAME", text))
    assert texts[0] == texts[1], texts


def test_fifos_were_never_opened(env):
    """A FIFO opened for reading by the server would hold a reader; with none, a non-blocking
    open for writing fails with ENXIO. (A hang would also have failed the cases above.)"""
    import errno

    for key, path in env.paths.items():
        if key.startswith("fifo:"):
            with pytest.raises(OSError) as e:
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            assert e.value.errno == errno.ENXIO, path


def test_model_info_shows_folder_names_not_server_paths(env):
    entry = env.run(loader(), timeout=CASE_TIMEOUT)
    text = h.ui_output(entry, "2")["text"]
    text = text[0] if isinstance(text, list) else text
    assert env.base not in text and json.loads(text)["file"] == I2V


def test_a_full_video_still_renders_after_the_hostile_cases(env):
    entry = env.run(sampler(), timeout=600)
    assert h.ui_output(entry, "17")["images"], entry["outputs"]
