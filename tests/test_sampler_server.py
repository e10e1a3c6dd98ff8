"""The InfiniteTalk sampler graph over HTTP in a real ComfyUI (CPU, tiny models).

LoadImage -> VAELoader (tiny Wan VAE) -> InfiniteTalk Image to Video (no CLIP vision: ComfyUI's
CLIPVisionLoader needs a full ViT-H file, so the optional input stays empty and zero tokens are
used); WanVideo Load Text Embeds; WanVideo Model Loader (tiny I2V with InfiniteTalk merged);
LoadAudio -> audio embeds -> WanVideo InfiniteTalk Sampler -> a summary output node.

The audio embeds come from the pack's Wav2Vec2 Model Loader + InfiniteTalk Audio Embeds with a
tiny random wav2vec2 of width 768 when those nodes are registered; otherwise from a test-only
stub node (random features of the right length, the loaded AUDIO passed through). The stub pack,
installed in this server's base directory, also holds the summary node that reports the IMAGE
and AUDIO shapes.
"""
from __future__ import annotations

import json
import os
import time

import pytest

import comfy_harness as h
import graph_nodes as gn
import demo_assets

pytestmark = pytest.mark.comfy

MODEL = "wan21_tiny_i2v_infinitetalk.safetensors"
WAV2VEC = "tiny_wav2vec2_768"
EMBEDS = "test_prompt.safetensors"

STUB = r'''
import json
import torch


class _Audio:
    def __init__(self, features, audio):
        self.features, self.masks, self.audio = features, None, audio


class TestInfiniteTalkAudioStub:
    CATEGORY = "testing"
    RETURN_TYPES = ("INFINITETALK_AUDIO",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"audio": ("AUDIO",)}}

    def run(self, audio):
        wave = audio["waveform"]
        frames = int(wave.shape[-1] / audio["sample_rate"] * 25)
        g = torch.Generator().manual_seed(0)
        return (_Audio([torch.randn(frames, 12, 768, generator=g)], audio),)


class TestBlockSwapArgs:
    CATEGORY = "testing"
    RETURN_TYPES = ("BLOCKSWAPARGS",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"blocks_to_swap": ("INT", {"default": 1})}}

    def run(self, blocks_to_swap):
        return ({"blocks_to_swap": blocks_to_swap, "prefetch": 1},)


class TestVideoSummary:
    CATEGORY = "testing"
    RETURN_TYPES = ()
    FUNCTION = "run"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"images": ("IMAGE",), "audio": ("AUDIO",)}}

    def run(self, images, audio):
        info = {"images": list(images.shape), "min": float(images.min()),
                "max": float(images.max()), "sample_rate": int(audio["sample_rate"]),
                "seconds": audio["waveform"].shape[-1] / audio["sample_rate"],
                "checksum": float(images.double().sum())}
        return {"ui": {"summary": [json.dumps(info)]}}


NODE_CLASS_MAPPINGS = {"TestInfiniteTalkAudioStub": TestInfiniteTalkAudioStub,
                       "TestBlockSwapArgs": TestBlockSwapArgs,
                       "TestVideoSummary": TestVideoSummary}
'''


def _prepare(base: str) -> None:
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    h.prepare_base(base)
    from wanvideo_infinitetalk.multitalk import tiny
    from wanvideo_infinitetalk.wanvideo.tiny_models import TINY_I2V, random_state_dict, write_checkpoint

    sd = random_state_dict(TINY_I2V, seed=0)
    sd.update(tiny.infinitetalk_state_dict(TINY_I2V.dim, TINY_I2V.num_layers))
    write_checkpoint(sd, os.path.join(base, "models", "diffusion_models", MODEL), dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    embeds = os.path.join(base, "models", "text_embeds")
    os.makedirs(embeds, exist_ok=True)
    save_file({"positive": torch.randn(1, 6, 4096, generator=g),
               "negative": torch.randn(1, 4, 4096, generator=g)},
              os.path.join(embeds, EMBEDS), metadata={"format": "wanvideo_text_embeds", "version": "1"})
    save_file({"something": torch.zeros(2, 2)}, os.path.join(embeds, "not_embeds.safetensors"))
    img = (torch.rand(80, 96, 3, generator=g) * 255).to(torch.uint8).numpy()
    Image.fromarray(img).save(os.path.join(base, "input", "portrait.png"))
    demo_assets.tone_wav(os.path.join(base, "input", "speech3s.wav"), 3.0)
    demo_assets.tone_wav(os.path.join(base, "input", "speech12s.wav"), 12.0)
    # features must be 768 wide for the audio projection; 12 layers like the real encoder
    tiny.write_tiny_wav2vec2(os.path.join(base, "models", "wav2vec2", WAV2VEC), hidden=768)
    stub = os.path.join(base, "custom_nodes", "infinitetalk_test_stub")
    os.makedirs(stub, exist_ok=True)
    with open(os.path.join(stub, "__init__.py"), "w") as f:
        f.write(STUB)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not os.path.isfile(os.path.join(h.COMFY_DIR, "main.py")):
        pytest.skip("ComfyUI is not extracted: run `make setup`")
    base = str(tmp_path_factory.mktemp("sampler_base"))
    _prepare(base)
    # latent2rgb previews: the sampler's preview path runs on every step
    srv = h.ComfyServer(base, extra=["--preview-method", "latent2rgb"]).start()
    client = h.ComfyClient(srv)
    client.base = base
    try:
        assert srv.import_problems() == [], srv.log_text()[-4000:]
        info = client.object_info()
        for node in ("InfiniteTalkImageToVideo", "WanVideoLoadTextEmbeds",
                     "WanVideoInfiniteTalkSampler", "TestInfiniteTalkAudioStub"):
            assert node in info, f"{node} missing\n" + srv.log_text()[-4000:]
        client.real_audio = {"Wav2Vec2ModelLoader", "InfiniteTalkAudioEmbeds"} <= set(info)
        graph.real_audio = client.real_audio
        yield client
    finally:
        client.close()
        srv.stop()


def graph(audio="speech3s.wav", width=64, height=64, clip=81, motion=9, steps=2,
          embeds=EMBEDS, seed=3) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": h.TINY_VAE_NAME}},
        "3": gn.image_to_video(["1", 0], ["2", 0], width, height, clip, motion),
        "4": {"class_type": "WanVideoLoadTextEmbeds", "inputs": {"embeds": embeds}},
        "5": gn.model_loader(MODEL),
        "6": {"class_type": "LoadAudio", "inputs": {"audio": audio}},
        "7": {"class_type": "TestInfiniteTalkAudioStub", "inputs": {"audio": ["6", 0]}},
        "8": gn.sampler(["5", 0], ["4", 0], ["4", 1], ["3", 0], ["7", 0], ["2", 0], steps=steps,
                        seed=seed, text_guidance=5.0, audio_guidance=4.0, color_correction=0.5),
        "9": {"class_type": "TestVideoSummary", "inputs": {"images": ["8", 0], "audio": ["8", 1]}},
    } | (_real_audio_nodes() if graph.real_audio else {})


def _real_audio_nodes() -> dict:
    return {"7": {"class_type": "InfiniteTalkAudioEmbeds",
                  "inputs": {"wav2vec2": ["11", 0], "audio": ["6", 0], "mode": "para"}},
            "11": {"class_type": "Wav2Vec2ModelLoader", "inputs": {"model": WAV2VEC}}}


graph.real_audio = False


def _summary(entry: dict) -> dict:
    return json.loads(h.ui_output(entry, "9")["summary"][0])


def test_schema_has_tooltips_and_category(server):
    info = server.object_info()
    for node in ("InfiniteTalkImageToVideo", "WanVideoLoadTextEmbeds", "WanVideoSaveTextEmbeds",
                 "WanVideoInfiniteTalkSampler"):
        spec = info[node]
        assert spec["category"] == "WanVideo InfiniteTalk"
        for section in ("required", "optional"):
            for name, decl in spec["input"].get(section, {}).items():
                assert (decl[1] if len(decl) > 1 else {}).get("tooltip"), f"{node}.{name}"
    assert info["WanVideoInfiniteTalkSampler"]["output"] == ["IMAGE", "AUDIO", "VIDEO"]
    assert "BLOCKSWAPARGS" in str(info["WanVideoInfiniteTalkSampler"]["input"]["optional"])


def test_three_seconds_make_75_frames_and_3s_audio(server):
    entry = server.run(graph(), timeout=600)
    s = _summary(entry)
    assert s["images"] == [75, 64, 64, 3]
    assert 0.0 <= s["min"] <= s["max"] <= 1.0
    assert abs(s["seconds"] - 3.0) < 1e-6
    progress = [m["data"] for m in entry["events"] if m["type"] == "progress"
                and m["data"]["node"] == "8"]
    assert progress and progress[-1]["value"] == progress[-1]["max"] == 2
    log = server.log_text()
    assert "InfiniteTalk window 1/1: frames 0-74" in log
    assert "no CLIP vision output connected" in log


@pytest.mark.parametrize("stream", [True, False])
def test_video_output_saves_an_mp4_with_every_frame_and_the_audio(server, stream):
    """stream_to_mp4 writes the file window by window (the sampler previews it); either way the
    VIDEO output goes through ComfyUI's SaveVideo to an MP4 of 75 frames with 3 s of audio."""
    import av

    g = graph(audio="speech12s.wav" if stream else "speech3s.wav", seed=11 + stream, steps=1)
    g["8"]["inputs"].update(stream_to_mp4=stream, filename_prefix="stream/it")
    del g["9"]
    g["20"] = {"class_type": "SaveVideo", "inputs": {"video": ["8", 2], "filename_prefix":
                                                     f"saved/stream{int(stream)}",
                                                     "format": "auto", "codec": "auto"}}
    entry = server.run(g, timeout=900)
    saved = h.ui_output(entry, "20")["images"][0]
    path = os.path.join(server.base, "output", saved["subfolder"], saved["filename"])
    frames = 300 if stream else 75
    with av.open(path) as c:
        assert sum(1 for _ in c.decode(c.streams.video[0])) == frames
    with av.open(path) as c:
        a = c.streams.audio[0]
        seconds = sum(f.samples for f in c.decode(a)) / a.rate
    assert abs(seconds - frames / 25) < 0.07, seconds
    if stream:
        preview = h.ui_output(entry, "8")["images"][0]
        assert preview["subfolder"] == "stream" and preview["filename"].endswith(".mp4")
        assert os.path.isfile(os.path.join(server.base, "output", "stream", preview["filename"]))


def test_text_embeds_save_and_load_round_trip(server):
    from safetensors.torch import load_file

    g = {"1": {"class_type": "WanVideoLoadTextEmbeds", "inputs": {"embeds": EMBEDS}},
         "2": {"class_type": "WanVideoSaveTextEmbeds",
               "inputs": {"positive": ["1", 0], "negative": ["1", 1],
                          "filename_prefix": "roundtrip/copy"}}}
    entry = server.run(g, timeout=120)
    folder = os.path.join(server.base, "models", "text_embeds")
    saved = load_file(os.path.join(folder, "roundtrip", "copy_00001.safetensors"))
    original = load_file(os.path.join(folder, EMBEDS))
    for key in ("positive", "negative"):
        assert saved[key].equal(original[key])
    assert "roundtrip/copy_00001.safetensors" in json.dumps(h.ui_output(entry, "2"))


def test_block_swap_args_give_identical_frames_and_previews_are_sent(server):
    import uuid

    import websocket

    plain = _summary(server.run(graph(seed=11), timeout=600))
    g = graph(seed=11)
    if "WanVideoBlockSwap" in server.object_info():   # the pack's settings node
        g["10"] = {"class_type": "WanVideoBlockSwap",
                   "inputs": {"blocks_to_swap": 1, "prefetch": 1, "offload_non_block": False,
                              "pin_memory": False, "show_stats": True}}
    else:                                               # a plain dict of BlockSwap keywords
        g["10"] = {"class_type": "TestBlockSwapArgs", "inputs": {"blocks_to_swap": 1}}
    g["8"]["inputs"]["block_swap_args"] = ["10", 0]
    # a second websocket client of our own counts the binary preview frames
    cid = uuid.uuid4().hex
    ws = websocket.create_connection(server.url.replace("http://", "ws://") + f"/ws?clientId={cid}",
                                     timeout=300)
    try:
        status, body = server._request("POST", "/prompt", {"prompt": g, "client_id": cid})
        assert status == 200 and not body.get("node_errors"), body
        previews, done = 0, None
        while done is None:
            msg = ws.recv()
            if isinstance(msg, bytes):
                previews += 1
            else:
                data = json.loads(msg)
                if data["type"] in h.TERMINAL and data["data"].get("prompt_id") == body["prompt_id"]:
                    done = data["type"]
    finally:
        ws.close()
    assert done == "execution_success", server.log_text()[-3000:]
    entry = None
    for _ in range(100):  # the websocket reports success a moment before /history has the entry
        entry = server.history(body["prompt_id"])
        if entry is not None:
            break
        time.sleep(0.1)
    swapped = _summary(entry | {"events": []})
    assert swapped["checksum"] == plain["checksum"]
    assert previews >= 2                       # one per step (2 steps)
    assert "BlockSwap 1 blocks" in server.log_text()


def test_interrupt_mid_window_then_next_prompt_succeeds(server):
    pid = server.queue(graph(audio="speech12s.wav", clip=17, motion=5, steps=50, seed=4))
    server.wait_progress(pid, "8")
    server.interrupt()
    entry = server.wait(pid, timeout=300)
    kinds = [m["type"] for m in entry["events"]]
    assert "execution_interrupted" in kinds, kinds
    assert "execution_success" not in kinds
    entry = server.run(graph(seed=5), timeout=600)   # the cached model still works
    assert _summary(entry)["images"][0] == 75


@pytest.mark.parametrize("change, needle", [
    ({"width": 70}, "multiple of 16"),
    ({"clip": 80}, "4n+1"),
])
def test_bad_geometry_fails_before_any_work_with_a_clear_error(server, change, needle):
    """Rules a range cannot express are checked first thing at execution (declaring these
    inputs in validate_inputs would switch off ComfyUI's own range checks and repeat the
    message once per input)."""
    entry = server.wait(server.queue(graph(**change)), timeout=300)
    err = h.execution_error(entry)
    assert err is not None and needle in err["exception_message"], entry["status"]
    assert err["node_id"] == "3", err


@pytest.mark.parametrize("change, field", [
    ({"width": 100000}, "width"), ({"height": 8}, "height"), ({"clip": 1001}, "clip_length"),
])
def test_out_of_range_geometry_is_refused_once_at_validation(server, change, field):
    with pytest.raises(h.PromptRejected) as e:
        server.queue(graph(**change))
    errors = e.value.node_errors["3"]["errors"]
    assert len(errors) == 1, errors                       # one message, not one per input
    assert errors[0]["type"] in ("value_bigger_than_max", "value_smaller_than_min"), errors
    assert errors[0]["extra_info"]["input_name"] == field, errors


def test_wrong_embeds_file_is_explained(server):
    pid = server.queue(graph(embeds="not_embeds.safetensors"))
    entry = server.wait(pid, timeout=300)
    err = h.execution_error(entry)
    assert err is not None and "not a WanVideo text embeds file" in err["exception_message"]
