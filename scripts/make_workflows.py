"""Writes example_workflows/*.json (UI format) and their API twins (example_workflows/api/).

The graphs are written here as API-format dicts (readable, reviewable), then converted by the real
ComfyUI frontend in Debian's chromium (scripts/browser/frontend.mjs: app.loadApiJson + positions +
Note nodes + app.graph.serialize()), so widget order, link slots and node shapes are exactly what
the frontend saves. Each result is loaded back and turned into a prompt with app.graphToPrompt();
that must reproduce the API graph, and it is stored as the API twin (used by scripts/demo.py when
no browser is available).

  .venv/bin/python scripts/make_workflows.py            # needs `make setup` (ComfyUI, chromium)
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import comfy_harness as h  # noqa: E402
import demo_assets as assets  # noqa: E402
import graph_nodes as gn  # noqa: E402
from frontend_client import Frontend  # noqa: E402

OUT_DIR = os.path.join(ROOT, "example_workflows")
API_DIR = os.path.join(OUT_DIR, "api")

# Public file names users download (see the Note node of each workflow for where from).
FILES = {
    "model": "wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors",
    "patch_single": "Wan2_1-InfiniTetalk-Single_fp16.safetensors",
    "patch_multi": "Wan2_1-InfiniteTalk-Multi_fp16.safetensors",
    "text_encoder": "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
    "clip_vision": "clip_vision_h.safetensors",
    "vae": "wan_2.1_vae.safetensors",
    "lora": "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
    "wav2vec2": "chinese-wav2vec2-base",
}
# Tiny stand-ins written by comfy_harness.prepare_base, under the same roles (tests copy them to
# the public names so the real workflows validate on a tiny server).
TINY_FILES = {
    "model": ("diffusion_models", "wan21_tiny_i2v_fp8_e4m3fn.safetensors"),
    "patch_single": ("infinitetalk", "infinitetalk_tiny_single.safetensors"),
    "patch_multi": ("infinitetalk", "infinitetalk_tiny_multi.safetensors"),
    "vae": ("vae", h.TINY_VAE_NAME),
    "lora": ("loras", "wan21_tiny_lora.safetensors"),
    "wav2vec2": ("wav2vec2", "tiny-wav2vec2"),
}
FOLDERS = {"model": "diffusion_models", "patch_single": "infinitetalk", "patch_multi": "infinitetalk",
           "text_encoder": "text_encoders", "clip_vision": "clip_vision", "vae": "vae",
           "lora": "loras", "wav2vec2": "wav2vec2"}

POSITIVE = ("A person talks to the camera in a calm, friendly way; natural lip movements that "
            "follow the speech, subtle head motion and blinking, soft studio light, sharp details.")
NEGATIVE = ("bright tones, overexposed, static, blurred details, subtitles, style, artwork, "
            "painting, still picture, overall gray, worst quality, low quality, JPEG compression "
            "artifacts, ugly, deformed, disfigured, extra fingers, poorly drawn hands, poorly drawn "
            "face, fused fingers, messy background, many people in the background, walking "
            "backwards")

COL = 440   # column width of the layout grid
ROW = 60    # row unit


def at(col: float, row: float) -> list[int]:
    return [int(col * COL), int(row * ROW)]


def _model_files_note(two: bool) -> str:
    patch = FILES["patch_multi" if two else "patch_single"]
    return "\n".join([
        "MODEL FILES (put them under ComfyUI/models/):",
        f"  diffusion_models/{FILES['model']}",
        "      Wan2.1 I2V 14B 480p, fp8 (Comfy-Org/Wan_2.1_ComfyUI_repackaged)",
        f"  infinitetalk/{patch}   (or diffusion_models/)",
        "      InfiniteTalk " + ("multi" if two else "single") + "-speaker patch "
        "(Kijai/WanVideo_comfy, InfiniteTalk/)",
        f"  loras/{FILES['lora']}",
        "      lightx2v step/CFG distillation LoRA (Kijai/WanVideo_comfy, Lightx2v/)",
        f"  text_encoders/{FILES['text_encoder']}",
        f"  clip_vision/{FILES['clip_vision']}",
        f"  vae/{FILES['vae']}   (all three: Comfy-Org/Wan_2.1_ComfyUI_repackaged)",
        f"  wav2vec2/{FILES['wav2vec2']}/   config.json + model.safetensors",
        "      (TencentGameMate/chinese-wav2vec2-base)",
        "",
        "FOR A 12-16 GB GPU: the fp8 file is already fp8, so quantization stays 'none' (choose",
        "fp8_e4m3fn or fp8_e4m3fn_scaled only for a bf16/fp16 file). Weights load into RAM",
        "(load_device offload_device; 32 GB system RAM recommended) and WanVideo BlockSwap with",
        "blocks_to_swap -1 (auto) streams as many of the 40 blocks as the free VRAM needs.",
        "",
        "SPEED: the lightx2v LoRA allows 6 steps with text_guidance 1 and audio_guidance 1 (one",
        "model pass per step). Without it (LoRA strength 0): 40 steps, text 5, audio 4.",
        "",
        "LENGTH: the video is as long as the speech (25 fps); windows of 81 frames overlap by 9.",
    ] + (["",
          "TWO SPEAKERS: speaker_1_mask.png / speaker_2_mask.png are white where each person is",
          "(same size as the portrait; paint them in the mask editor or any image editor). Without",
          "masks, disconnect both and use speaker_boxes, e.g. '0,0,0.5,1; 0.5,0,1,1'.",
          "mode 'para' = both talk at once, 'add' = speaker 1 then speaker 2."] if two else []))


def real_workflow(two: bool) -> tuple[dict, dict, list]:
    """The Wan2.1-I2V-14B + InfiniteTalk graph for a 12-16 GB GPU; two speakers with masks."""
    width, height = (832, 480) if two else (480, 832)
    g = {
        "1": {"class_type": "InfiniteTalkModelLoader",
              "inputs": {"model": FILES["patch_multi" if two else "patch_single"]}},
        "2": {"class_type": "WanVideoLoraSelect", "inputs": {"lora": FILES["lora"], "strength": 1.0}},
        "3": {"class_type": "WanVideoModelLoader",
              "inputs": {"model": FILES["model"], "base_precision": "bf16", "attention": "sdpa",
                         "load_device": "offload_device", "quantization": "none", "fp8_matmul": "fast",
                         "infinitetalk": ["1", 0], "lora": ["2", 0]}},
        "4": {"class_type": "WanVideoBlockSwap",
              "inputs": {"blocks_to_swap": -1, "prefetch": 1, "offload_non_block": False,
                         "pin_memory": True, "show_stats": False}},
        "5": {"class_type": "CLIPLoader",
              "inputs": {"clip_name": FILES["text_encoder"], "type": "wan", "device": "default"}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": POSITIVE, "clip": ["5", 0]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": NEGATIVE, "clip": ["5", 0]}},
        "8": {"class_type": "LoadImage", "inputs": {"image": assets.REAL_INPUTS["image"]}},
        "9": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": FILES["clip_vision"]}},
        "10": {"class_type": "CLIPVisionEncode",
               "inputs": {"clip_vision": ["9", 0], "image": ["8", 0], "crop": "none"}},
        "11": {"class_type": "VAELoader", "inputs": {"vae_name": FILES["vae"]}},
        "12": gn.image_to_video(["8", 0], ["11", 0], width, height,
                                clip_vision_output=["10", 0]),
        "13": {"class_type": "LoadAudio", "inputs": {"audio": assets.REAL_INPUTS["audio"]}},
        "14": {"class_type": "Wav2Vec2ModelLoader", "inputs": {"model": FILES["wav2vec2"]}},
        "15": gn.audio_embeds(["14", 0], ["13", 0]),
        "16": gn.sampler(["3", 0], ["6", 0], ["7", 0], ["12", 0], ["15", 0], ["11", 0], steps=6,
                         seed=42, block_swap_args=["4", 0], stream_to_mp4=False,
                         filename_prefix="InfiniteTalk"),
        "17": gn.create_video(["16", 0], ["16", 1]),
        "18": gn.save_video(["17", 0], "video/infinitetalk", "mp4", "h264"),
    }
    pos = {"1": at(0, 0), "2": at(0, 2.5), "3": at(1, 0), "4": at(1, 5),
           "5": at(0, 9), "6": at(1, 9), "7": at(1, 13),
           "8": at(0, 13), "9": at(0, 20), "10": at(2, 13), "11": at(0, 22.5), "12": at(2, 17),
           "13": at(2, 0), "14": at(2, 3), "15": at(2, 5.5),
           "16": at(3, 0), "17": at(4, 0), "18": at(4, 3)}
    sizes = {"6": [400, 200], "7": [400, 200], "16": [400, 0], "18": [400, 0]}
    if two:
        g["15"]["inputs"].update(audio_2=["19", 0], mask_1=["20", 0], mask_2=["21", 0])
        g["19"] = {"class_type": "LoadAudio", "inputs": {"audio": assets.REAL_INPUTS["audio_2"]}}
        g["20"] = {"class_type": "LoadImageMask",
                   "inputs": {"image": assets.REAL_INPUTS["mask_1"], "channel": "red"}}
        g["21"] = {"class_type": "LoadImageMask",
                   "inputs": {"image": assets.REAL_INPUTS["mask_2"], "channel": "red"}}
        g["18"]["inputs"]["filename_prefix"] = "video/infinitetalk_two_speakers"
        pos.update({"13": at(5, 0), "19": at(5, 3), "14": at(2, 0), "15": at(2, 3),
                    "20": at(5, 6), "21": at(5, 14), "16": at(3, 0), "17": at(4, 0),
                    "18": at(4, 3)})
    notes = [{"title": "Read me: model files and settings", "text": _model_files_note(two),
              "pos": at(3, 13 if two else 14), "size": [860, 560]}]
    return g, {"positions": pos, "sizes": sizes}, notes


def dubbing_workflow() -> tuple[dict, dict, list]:
    """Re-voice a video: LoadVideo + new speech -> InfiniteTalk Video to Video -> sampler, the
    finished windows streamed into an MP4 that SaveVideo copies (any length in flat RAM)."""
    g, layout, _ = real_workflow(two=False)
    for nid in ("8", "10", "12", "17"):
        del g[nid]
    g["8"] = {"class_type": "LoadVideo", "inputs": {"file": assets.REAL_INPUTS["video"]}}
    g["12"] = {"class_type": "InfiniteTalkVideoToVideo",
               "inputs": {"vae": ["11", 0], "source_video": ["8", 0], "source_fps": 25.0,
                          "clip_vision": ["9", 0], "width": 832, "height": 480,
                          "clip_length": 81, "motion_frames": 9, "past_end": "freeze",
                          "color_reference": "source_frame_0"}}
    g["16"]["inputs"].update(color_correction=0.5, stream_to_mp4=True,
                             filename_prefix="video/infinitetalk_dubbing_windows")
    g["18"]["inputs"].update(video=["16", 2], filename_prefix="video/infinitetalk_dubbing")
    pos = dict(layout["positions"])
    for nid in ("10", "17"):
        pos.pop(nid)
    pos.update({"8": at(0, 13), "12": at(2, 14), "18": at(4, 0)})
    text = "\n".join([
        "DUBBING: the new speech drives lips, head and expressions; identity, framing and broad",
        "motion follow the source video. Each window of 81 frames is conditioned on the source",
        "frame shown when it starts (every 72 frames, matched by time, so any source frame rate",
        "works). Speech longer than the source: past_end freeze (last frame), loop or pingpong.",
        "The source's own audio is not used; the MP4 carries the new speech.",
        "",
        f"Inputs: input/{assets.REAL_INPUTS['video']} (the video), input/"
        f"{assets.REAL_INPUTS['audio']} (the new speech).",
        "Model files: as in infinitetalk_single_speaker (see its note).",
        "",
        "stream_to_mp4 writes each finished window to disk, so RAM stays flat for long videos.",
    ])
    notes = [{"title": "Read me: dubbing", "text": text, "pos": at(3, 13), "size": [760, 300]}]
    return g, {"positions": pos, "sizes": layout["sizes"]}, notes


def two_gpus_workflow() -> tuple[dict, dict, list]:
    """The single-speaker graph with every window shared by GPUs 0 and 1 (WanVideo Multi-GPU)."""
    g, layout, _ = real_workflow(two=False)
    g["22"] = gn.multi_gpu("0,1", "auto")
    g["16"]["inputs"]["multi_gpu"] = ["22", 0]
    g["18"]["inputs"]["filename_prefix"] = "video/infinitetalk_two_gpus"
    pos = dict(layout["positions"], **{"22": at(1, 8.3)})
    pos.update({"6": at(1, 10.5), "7": at(1, 14.5)})
    text = "\n".join([
        "TWO GPUs: WanVideo Multi-GPU starts one worker process per GPU (here 0 and 1); each",
        "loads its own copy of the model from the loader's file and options, and every window's",
        "steps are shared between them: with the LoRA's one pass per step each pass is split by",
        "tokens (sequence parallel); with 2 guidance passes each GPU runs one. BlockSwap",
        "settings apply on every GPU. The VAE, CLIP vision and text encoder stay in ComfyUI's",
        "process on its GPU. gpus 'all' uses every visible GPU; one GPU runs as without the node.",
        "Cancel stops every worker at the next block; a worker that dies fails the prompt with",
        "its rank and GPU named, and the next prompt starts new workers (docs/MULTI_GPU.md).",
        "",
        "Model files and inputs: as in infinitetalk_single_speaker (see its note).",
    ])
    notes = [{"title": "Read me: two GPUs", "text": text, "pos": at(3, 14), "size": [800, 300]}]
    return g, {"positions": pos, "sizes": layout["sizes"]}, notes


def tiny_workflow() -> tuple[dict, dict, list]:
    """Runs on the tiny models `make demo` writes (CPU, about a minute): cached text embeddings
    instead of umT5, no CLIP vision (zero tokens), tiny VAE/transformer/patch/wav2vec2."""
    g = {
        "1": {"class_type": "InfiniteTalkModelLoader",
              "inputs": {"model": "infinitetalk_tiny_single.safetensors"}},
        "2": {"class_type": "WanVideoModelLoader",
              "inputs": {"model": "wan21_tiny_i2v.safetensors", "base_precision": "fp32",
                         "attention": "sdpa", "load_device": "offload_device",
                         "quantization": "none", "fp8_matmul": "fast", "infinitetalk": ["1", 0]}},
        "3": {"class_type": "WanVideoBlockSwap",
              "inputs": {"blocks_to_swap": 1, "prefetch": 1, "offload_non_block": False,
                         "pin_memory": False, "show_stats": False}},
        "4": {"class_type": "WanVideoLoadTextEmbeds", "inputs": {"embeds": assets.EMBEDS}},
        "5": {"class_type": "LoadImage", "inputs": {"image": assets.PORTRAIT}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": h.TINY_VAE_NAME}},
        "7": gn.image_to_video(["5", 0], ["6", 0], 128, 128, clip=33),
        "8": {"class_type": "LoadAudio", "inputs": {"audio": assets.SPEECH}},
        "9": {"class_type": "Wav2Vec2ModelLoader", "inputs": {"model": "tiny-wav2vec2"}},
        "10": gn.audio_embeds(["9", 0], ["8", 0]),
        "11": gn.sampler(["2", 0], ["4", 0], ["4", 1], ["7", 0], ["10", 0], ["6", 0], steps=3,
                         seed=1, block_swap_args=["3", 0], stream_to_mp4=False,
                         filename_prefix="InfiniteTalk"),
        "12": gn.create_video(["11", 0], ["11", 1]),
        "13": gn.save_video(["12", 0], "video/infinitetalk_tiny_demo", "mp4", "h264"),
    }
    pos = {"1": at(0, 0), "2": at(1, 0), "3": at(1, 5), "4": at(0, 3), "5": at(0, 6),
           "6": at(0, 13), "7": at(1, 9), "8": at(2, 0), "9": at(2, 3), "10": at(2, 5.5),
           "11": at(3, 0), "12": at(4, 0), "13": at(4, 3)}
    text = "\n".join([
        "TINY DEMO: runs on the tiny random models and inputs `make demo` writes (.cache/demo),",
        "on a CPU in about a minute. The picture is noise: the weights are random. It exercises",
        "the real path: InfiniteTalk patch injection, wav2vec2 speech features, BlockSwap,",
        "windows of 33 frames (9 motion frames), VAE decode and an MP4 with the speech.",
        "",
        "Differences from the real workflows: cached prompt embeddings (WanVideo Load Text",
        "Embeds) instead of the 6 GB umT5 encoder, and no CLIP vision (the native loader needs",
        "the full ViT-H file; InfiniteTalk Image to Video then uses zero CLIP tokens).",
        f"Inputs: input/{assets.PORTRAIT}, input/{assets.SPEECH}, "
        f"models/text_embeds/{assets.EMBEDS}.",
    ])
    notes = [{"title": "Read me", "text": text, "pos": at(3, 13), "size": [760, 260]}]
    return g, {"positions": pos, "sizes": {"11": [400, 0], "13": [400, 0]}}, notes


WORKFLOWS = {
    "infinitetalk_single_speaker": lambda: real_workflow(two=False),
    "infinitetalk_two_speakers": lambda: real_workflow(two=True),
    "infinitetalk_dubbing": dubbing_workflow,
    "infinitetalk_tiny_demo": tiny_workflow,
    "infinitetalk_two_gpus": two_gpus_workflow,
}


# Inputs the frontend adds on its own (the audio player widget of LoadAudio).
FRONTEND_ONLY_INPUTS = {"audioUI"}


def graph_differences(expected: dict, got: dict) -> list[str]:
    """How API graph `got` (from graphToPrompt) differs from `expected`; [] when equal apart
    from _meta titles and FRONTEND_ONLY_INPUTS."""
    out = []
    for nid in sorted(set(expected) | set(got)):
        a, b = expected.get(nid), got.get(nid)
        if a is None or b is None:
            out.append(f"node {nid} only in {'graphToPrompt' if a is None else 'the source'}")
            continue
        if a["class_type"] != b["class_type"]:
            out.append(f"node {nid}: {a['class_type']} became {b['class_type']}")
        want, have = ({k: v for k, v in n["inputs"].items() if k not in FRONTEND_ONLY_INPUTS}
                      for n in (a, b))
        if have != want:
            keys = sorted(set(have) | set(want))
            out += [f"node {nid} ({a['class_type']}).{k}: {want.get(k)!r} -> {have.get(k)!r}"
                    for k in keys if want.get(k) != have.get(k)]
    return out


def install_tiny_stand_ins(base: str) -> dict[str, str]:
    """Copies of the tiny models under the real workflows' public file names (not the umT5 and
    CLIP vision files: those loaders need full-size files). Returns {public name: path}."""
    import shutil

    models = os.path.join(os.path.abspath(base), "models")
    out = {}
    for role, (folder, name) in TINY_FILES.items():
        src = os.path.join(models, folder, name)
        dst = os.path.join(models, FOLDERS[role], FILES[role])
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src):
            if not os.path.isdir(dst):
                shutil.copytree(src, dst)
        elif not os.path.exists(dst):
            shutil.copy(src, dst)
        out[FILES[role]] = dst
    return out


def convert(fe: Frontend, name: str) -> tuple[dict, dict]:
    """(UI workflow, API twin) of WORKFLOWS[name], checked to round-trip through the frontend."""
    api, layout, notes = WORKFLOWS[name]()
    ui = fe.api_to_ui(api, positions=layout["positions"], sizes=layout["sizes"], notes=notes,
                      title=name)
    ui.pop("id", None)  # a fresh id is made when a user opens it
    back = fe.load_ui(ui)
    if back["missing"]:
        raise SystemExit(f"{name}: unknown node types {back['missing']}")
    twin = back["prompt"]
    problems = graph_differences(api, twin)
    if problems:
        raise SystemExit(f"{name}: graphToPrompt does not reproduce the graph: {problems}")
    return ui, twin


def main() -> int:
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="make_workflows_") as base:
        h.prepare_base(base)
        assets.prepare_demo_inputs(base)
        assets.prepare_real_inputs(base)
        server = h.ComfyServer(base).start()
        try:
            with Frontend(server.url) as fe:
                os.makedirs(API_DIR, exist_ok=True)
                for name in WORKFLOWS:
                    ui, twin = convert(fe, name)
                    for path, data in ((os.path.join(OUT_DIR, f"{name}.json"), ui),
                                       (os.path.join(API_DIR, f"{name}.json"), twin)):
                        with open(path, "w", encoding="utf-8") as f:
                            json.dump(data, f, indent=2)
                            f.write("\n")
                    print(f"[make_workflows] {name}: {len(ui['nodes'])} nodes, "
                          f"{len(ui['links'])} links -> example_workflows/{name}.json (+ api/)")
        finally:
            server.stop()
    print(f"[make_workflows] done in {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
