"""End-to-end benchmark: the single-speaker example workflow (its API twin) through a real ComfyUI
server with this pack installed, at full size, on cards of 12 / 16 / 24 GB rehearsed on a big GPU.

    python bench/e2e.py --models DIR [--generate] --cards 12,24 --out e2e.json
    python bench/e2e.py --models DIR --cards 16 --plan cold,long --long-seconds 60 --out long.json
    python bench/e2e.py --tiny --cards 0 --out e2e_tiny.json     # CPU smoke run, tiny models

Per card a fresh server runs the plan (--plan, in its order; default cold,warm,official, plus long
when --long-seconds is given): cold (every model loaded), warm (new speech and seed, models
cached), official (one window of the official recipe, 3 guidance passes, to time its steps; on the
16 GB card or with --tiny only) and long (--long-seconds of speech, the speech file of the warm run
repeated, LoRA recipe, the sampler's stream_to_mp4 on: each window goes into an MP4 as it is made
and SaveVideo takes that file, with no CreateVideo and no IMAGE batch of the whole video). Per
executed node: wall time from ComfyUI's websocket messages, peak card memory (NVML: what the card
holds, CUDA context included) and server RSS; per window the sampler's own sample / decode /
encode split and the server RSS at the end of its sampling and its peak (cut by the sampler's
progress messages; target: growth <= 1 GB from window 2 to the last); every MP4 (SaveVideo's and
the streamed one) is opened and its frames and audio counted against the speech's length.

A smaller card is rehearsed two ways at once, because each alone is wrong (docs/BENCHMARKS.md):
PyTorch's per-process memory fraction makes an allocation past the card fail as it would on the
card (and the pack's readings honour it), and ComfyUI's --reserve-vram makes ComfyUI's own
free-memory reading (which asks the driver, blind to that fraction) see the smaller card.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tarfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import comfy_harness as harness  # noqa: E402
import e2e_stages as stages  # noqa: E402

GiB = 1 << 30
# Memory a real card spends outside PyTorch's allocator (CUDA context, cuBLAS/cuDNN handles):
# taken off the allocator's cap so the whole process fits the card.
OUTSIDE_ALLOCATOR = int(0.75 * GiB)
# Plan entries -> (result label, speech input, seed).
RUNS = {"cold": ("cold", "cold", 1), "warm": ("warm", "warm", 2),
        "official": ("official_one_window", "warm", 3), "long": ("long", "long", 4)}
RSS_GROWTH_TARGET_GB = 1.0
TINY_LONG_SIZE = 64  # frame side of the tiny long run (the tiny demo's is 128)
WORKFLOW = os.path.join(ROOT, "example_workflows", "api", "infinitetalk_single_speaker.json")
TINY_WORKFLOW = os.path.join(ROOT, "example_workflows", "api", "infinitetalk_tiny_demo.json")
NEEDED = ["wan2.1_i2v_480p_14B_fp8_e4m3fn.safetensors", "Wan2_1-InfiniTetalk-Single_fp16.safetensors",
          "lightx2v_I2V_14B_480p_cfg_step_distill_rank64_bf16.safetensors",
          "umt5_xxl_fp8_e4m3fn_scaled.safetensors", "clip_vision_h.safetensors",
          "wan_2.1_vae.safetensors", "chinese-wav2vec2-base"]
CAP_NODE = '''"""Written by bench/e2e.py: caps PyTorch's allocator to the rehearsed card."""
import os
import torch
_card = float(os.environ.get("WANVIDEO_BENCH_CARD_GB", "0") or 0)
if _card > 0 and torch.cuda.is_available():
    _total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, (_card * 2**30 - {outside}) / _total), 0)
NODE_CLASS_MAPPINGS = {{}}
'''


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help="folder of full-size stand-ins (ComfyUI model folder layout)")
    p.add_argument("--generate", action="store_true", help="write missing stand-ins first")
    p.add_argument("--comfy-tar", help="a ComfyUI tarball to unpack when .cache/ComfyUI is absent")
    p.add_argument("--work", default=os.path.join(ROOT, "artifacts", "e2e"))
    p.add_argument("--cards", default="12,16,24", help="card sizes in GiB; 0 = the whole GPU")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--steps", type=int, default=4, help="LoRA recipe: steps at guidance 1")
    p.add_argument("--official-steps", type=int, default=3,
                   help="steps of the timed official-recipe window (16 GB card)")
    p.add_argument("--speech", nargs=2, metavar="WAV",
                   help="two speech files (cold, warm; the long run repeats the second)")
    p.add_argument("--long-seconds", type=float, default=0.0,
                   help="seconds of speech of the long run (0 = no long run)")
    p.add_argument("--plan", default=None,
                   help="runs per card, in order, from " + ",".join(RUNS) + " (default "
                        "cold,warm,official, plus long with --long-seconds); official runs on "
                        "the 16 GB card or with --tiny only")
    p.add_argument("--attention", default=None,
                   help="the model loader's attention backend for every run (default: the "
                        "workflow's own, sdpa)")
    p.add_argument("--tiny", action="store_true", help="tiny models on the CPU (smoke run)")
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.plan is None:
        args.plan = "cold,warm,official" + (",long" if args.long_seconds > 0 else "")
    args.plan = [r.strip() for r in args.plan.split(",") if r.strip()]
    unknown = [r for r in args.plan if r not in RUNS]
    if unknown or not args.plan:
        p.error(f"--plan: unknown runs {unknown}; choose from {list(RUNS)}")
    if "long" in args.plan and args.long_seconds <= 0:
        p.error("--plan names long: give --long-seconds")
    return args


def prepare_comfy(tar: str | None) -> None:
    if os.path.isfile(os.path.join(harness.COMFY_DIR, "main.py")):
        return
    if not tar:
        raise SystemExit(f"no ComfyUI at {harness.COMFY_DIR}; pass --comfy-tar")
    with tarfile.open(tar) as t:
        t.extractall(os.path.dirname(harness.COMFY_DIR))


def prepare_models(args) -> None:
    missing = [n for n in NEEDED if not _present(args.models, n)]
    if missing and not args.generate:
        raise SystemExit(f"missing stand-ins in {args.models}: {missing} (pass --generate)")
    if missing:  # in a child process: its CUDA context must not stay and count as used
        import subprocess

        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "wanvideo.make_full_size", args.models, "--only",
                        *missing, "--device", "cuda"], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        print(f"[e2e] stand-ins written in {time.perf_counter() - start:.0f} s", flush=True)


def _present(models: str, name: str) -> bool:
    return any(os.path.exists(os.path.join(models, d, name)) for d in os.listdir(models)) \
        if os.path.isdir(models) else False


def prepare_base(args, card: float) -> str:
    base = os.path.join(args.work, f"card{card:g}")
    if args.tiny:
        harness.prepare_base(base)
    else:
        for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
            os.makedirs(os.path.join(base, sub), exist_ok=True)
        harness.install_pack(base)
        link = os.path.join(base, "models")
        if not os.path.lexists(link):
            os.symlink(os.path.abspath(args.models), link)
    with open(os.path.join(base, "custom_nodes", "wanvideo_bench_card_cap.py"), "w") as f:
        f.write(CAP_NODE.format(outside=OUTSIDE_ALLOCATOR))
    return base


def write_inputs(args, base: str) -> dict[str, str]:
    import demo_assets

    names = {"image": "e2e_portrait.png", "cold": "e2e_speech_a.wav", "warm": "e2e_speech_b.wav"}
    inp = os.path.join(base, "input")
    if args.tiny:  # the tiny graph also reads the demo's text embeds
        demo_assets.prepare_demo_inputs(base)
    demo_assets.write_portrait(os.path.join(inp, names["image"]), size=512)
    for key, src in zip(("cold", "warm"), args.speech or (None, None)):
        exact_wav(src, os.path.join(inp, names[key]), args.seconds)
    if "long" in args.plan:  # real speech throughout: the warm run's file said again and again
        names["long"] = "e2e_speech_long.wav"
        repeat_wav(args.speech[1] if args.speech else None, os.path.join(inp, names["long"]),
                   args.long_seconds)
    return names


def repeat_wav(src: str | None, dst: str, seconds: float) -> None:
    """`src` repeated end to end and cut to exactly `seconds` (a modulated tone without src)."""
    _fit_wav(src, dst, seconds, repeat=True)


def exact_wav(src: str | None, dst: str, seconds: float) -> None:
    """`src` cut or padded with silence to exactly `seconds` (a modulated tone without src)."""
    _fit_wav(src, dst, seconds, repeat=False)


def _fit_wav(src: str | None, dst: str, seconds: float, repeat: bool) -> None:
    import wave

    import demo_assets

    if src is None:
        demo_assets.tone_wav(dst, seconds)
        return
    with wave.open(src) as r:
        params, data = r.getparams(), r.readframes(r.getnframes())
    if repeat and not data:
        raise SystemExit(f"{src} holds no audio")
    want = int(round(seconds * params.framerate)) * params.sampwidth * params.nchannels
    if repeat:
        data = data * (want // len(data) + 1)
    with wave.open(dst, "wb") as w:
        w.setparams(params)
        w.writeframes(data[:want] + b"\0" * max(0, want - len(data)))


def graph(args, names: dict, speech: str, seed: int, official: bool = False,
          stream: bool = False) -> dict:
    """The API workflow with the bench's inputs. `stream`: the sampler writes each window into an
    MP4 (stream_to_mp4) and returns that file as its VIDEO output; SaveVideo takes it directly
    (remuxed, not re-encoded) and CreateVideo, which would build the video from an IMAGE batch,
    is dropped (the sampler's images output then holds only the first frame)."""
    with open(TINY_WORKFLOW if args.tiny else WORKFLOW) as f:
        prompt = json.load(f)
    if stream:
        sid = sampler_id(prompt)
        prompt[sid]["inputs"].update(stream_to_mp4=True, filename_prefix="video/e2e_long_stream")
        for key in [k for k, v in prompt.items() if v["class_type"] == "CreateVideo"]:
            del prompt[key]
        save = next(v for v in prompt.values() if v["class_type"] == "SaveVideo")
        save["inputs"]["video"] = [sid, 2]
        if args.tiny:  # many windows in little CPU time: the VAE decode dominates a tiny
            # window and grows faster than the pixels (2 cores: ~1 s at 64x64, 5+ s at 128)
            for node in prompt.values():
                if node["class_type"] == "InfiniteTalkImageToVideo":
                    node["inputs"].update(width=TINY_LONG_SIZE, height=TINY_LONG_SIZE)
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind == "LoadImage":
            inputs["image"] = names["image"]
        elif kind == "WanVideoModelLoader" and args.attention:
            inputs["attention"] = args.attention
        elif kind == "LoadAudio":
            inputs["audio"] = names[speech]
        elif kind == "WanVideoInfiniteTalkSampler":
            inputs["seed"] = seed
            if not args.tiny:
                inputs.update(steps=args.steps, text_guidance=1.0, audio_guidance=1.0)
            if official:  # 3 passes: text and audio guidance as the official recipe
                inputs.update(steps=args.official_steps, text_guidance=5.0, audio_guidance=4.0,
                              max_frames=81)
    return prompt


def sampler_id(prompt: dict) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == "WanVideoInfiniteTalkSampler")


def run_once(client, server, monitor, prompt: dict, timeout: float,
             seconds: float | None = None) -> dict:
    """Queue `prompt`, wait, measure. `seconds`: the speech's length, which the MP4s must have
    (round(seconds x 25) frames, audio within 0.1 s); None: not checked."""
    log_from = len(server.log_text())
    queued = time.monotonic()
    prompt_id = client.queue(prompt)
    try:
        entry = client.wait(prompt_id, timeout)
        err = harness.execution_error(entry)
    except TimeoutError:  # keep what was measured (windows done so far), stop the prompt
        client.interrupt()
        entry = {"events": client.messages(prompt_id), "outputs": {}}
        err = {"exception_message": f"not finished after {timeout:g} s (--timeout); "
                                    "interrupted"}
    done = time.monotonic()
    log = server.log_text()[log_from:]
    sid = sampler_id(prompt)
    out = {"ok": err is None, "queue_to_done_s": round(done - queued, 2),
           "stream_to_mp4": bool(prompt[sid]["inputs"].get("stream_to_mp4")),
           "stages": stages.node_stages(entry, prompt, queued, monitor),
           "step_times_s": stages.step_times(entry, sid),
           "windows": stages.window_lines(log), "blocks_swapped": stages.blocks_swapped(log),
           **{k: round(v, 3) for k, v in monitor.window(queued, done).items()},
           **stages.window_rss(entry, sid, int(prompt[sid]["inputs"]["steps"]), monitor, queued,
                               RSS_GROWTH_TARGET_GB)}
    if err is not None:
        out["error"] = err
        out["log_tail"] = log[-4000:]
        return out
    save = next(k for k, v in prompt.items() if v["class_type"] == "SaveVideo")
    out["video"] = probe_video(server.base, entry, save, seconds)
    if out["stream_to_mp4"]:  # the file the sampler wrote window by window (its preview entry)
        out["streamed_video"] = probe_video(server.base, entry, sid, seconds)
    return out


def probe_video(base: str, entry: dict, node: str | None = None,
                seconds: float | None = None) -> dict:
    """Frames and audio length of the MP4 that `node` (any node: None) lists in its outputs; with
    `seconds`, whether they match round(seconds x 25) frames and seconds of audio (+-0.1 s)."""
    import av

    outputs = entry.get("outputs", {})
    for key, node_out in outputs.items():
        if node is not None and str(key) != str(node):
            continue
        for item in node_out.get("images", []) + node_out.get("videos", []):
            if str(item.get("filename", "")).endswith(".mp4"):
                path = os.path.join(base, "output", item.get("subfolder", ""), item["filename"])
                with av.open(path) as c:
                    frames = sum(1 for _ in c.decode(video=0))
                with av.open(path) as c:
                    a = c.streams.audio[0]
                    samples = sum(f.samples for f in c.decode(audio=0))
                    rate = a.rate
                out = {"file": path, "frames": frames, "audio_s": round(samples / rate, 3),
                       "bytes": os.path.getsize(path)}
                if seconds is not None:
                    want = int(round(seconds * 25))
                    out.update(frames_expected=want, frames_ok=frames == want,
                               audio_ok=abs(out["audio_s"] - seconds) <= 0.1)
                return out
    return {"file": None}


def run_card(args, card: float, save=lambda partial: None) -> dict:
    """The plan on one card; save(result so far) after every run (a later crash or a kill at a
    time limit keeps the runs done)."""
    base = prepare_base(args, card)
    names = write_inputs(args, base)
    extra = []
    gpu = None if args.tiny else 0
    if card > 0 and not args.tiny:
        import pynvml

        pynvml.nvmlInit()
        total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
        extra = ["--reserve-vram", f"{max(0.0, total / GiB - card):.2f}"]
    if not args.tiny and not _has_frontend():  # the API needs no UI: serve an empty page
        web = os.path.join(base, "web")
        os.makedirs(web, exist_ok=True)
        open(os.path.join(web, "index.html"), "w").close()
        extra += ["--front-end-root", web]
    os.environ["WANVIDEO_BENCH_CARD_GB"] = str(card)
    server = harness.ComfyServer(base, cpu=args.tiny, extra=extra).start(timeout=300)
    result = {"card_gib": card, "server_args": extra, "runs": {}}
    client = harness.ComfyClient(server)
    try:
        with stages.Monitor(server.proc.pid, gpu) as monitor:
            t0 = time.monotonic()
            for name in args.plan:
                if name == "official" and not (card == 16 or args.tiny):
                    continue
                label, speech, seed = RUNS[name]
                prompt = graph(args, names, speech, seed, official=name == "official",
                               stream=name == "long")
                seconds = {"cold": args.seconds, "warm": args.seconds,
                           "long": args.long_seconds}.get(name)
                run = result["runs"][label] = run_once(client, server, monitor, prompt,
                                                       args.timeout, seconds)
                growth = run.get("rss_growth_window2_to_last_gb")
                print(f"[e2e] card {card:g}: {label} {run['queue_to_done_s']} s ok={run['ok']}"
                      f" windows={len(run['rss_per_window_gb'])}"
                      + (f" rss growth window 2 -> last {growth} GB" if growth is not None
                         else ""), flush=True)
                result["trace"] = monitor.trace(t0)
                save(result)
                if not run["ok"]:
                    break
            result["trace"] = monitor.trace(t0)
        first = next(iter(result["runs"].values()), {})  # the run that loaded the models
        result["load"] = load_figures(result["runs"].get("cold", first))
        result["official_estimate"] = official_estimate(result["runs"], args)
    finally:
        client.close()
        server.stop()
    shutil.copy(server.log_path, os.path.join(args.work, f"comfyui_card{card:g}.log"))
    return result


def load_figures(cold: dict) -> dict:
    """The transformer loader's host memory: the server's RSS growth to its peak during the load
    against the growth it keeps (the model's final host bytes); the target is peak <= kept + 3 GB."""
    out = {}
    for s in cold.get("stages", []):
        if s["class"] in ("WanVideoModelLoader", "CLIPLoader", "CLIPVisionLoader", "VAELoader",
                          "InfiniteTalkModelLoader", "Wav2Vec2ModelLoader"):
            out[s["class"]] = {"wall_s": s["wall_s"],
                               "rss_peak_growth_gb": round(s["peak_rss_gb"] - s["rss_start_gb"], 3),
                               "rss_kept_growth_gb": round(s["rss_end_gb"] - s["rss_start_gb"], 3)}
    return out


def official_estimate(runs: dict, args) -> dict | None:
    """The official recipe (40 steps x 3 passes) for the same audio, from measured parts: the warm
    run minus its sampling, plus every window sampled at the measured 3-pass step time."""
    warm, one = runs.get("warm"), runs.get("official_one_window")
    if not (warm and one and warm.get("windows") and one.get("windows")):
        return None
    # steady steps: the intervals between the sampler's progress messages (the first step's own
    # time also holds the window's setup); the mean over the window when there is no interval
    mean = one["windows"][0]["sample_s"] / args.official_steps
    steady = one.get("step_times_s") or []
    step3 = statistics.median(steady) if steady else mean
    # a window = its first step (setup included) + 39 steady ones
    first = one["windows"][0]["sample_s"] - (args.official_steps - 1) * step3
    rest = warm["queue_to_done_s"] - sum(w["sample_s"] for w in warm["windows"])
    windows = len(warm["windows"])
    return {"three_pass_step_s": round(step3, 3), "three_pass_step_mean_s": round(mean, 3),
            "first_step_s": round(first, 3), "steady_step_times_s": steady, "windows": windows,
            "outside_sampling_s": round(rest, 2),
            "estimated_total_s": round(rest + windows * (first + 39 * step3), 1)}


def _has_frontend() -> bool:
    import importlib.util

    return importlib.util.find_spec("comfyui_frontend_package") is not None


def gpu_name() -> str:
    try:
        import pynvml

        pynvml.nvmlInit()
        name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
        return name.decode() if isinstance(name, bytes) else name
    except Exception:  # noqa: BLE001
        return "cpu"


def main(argv=None) -> int:
    args = parse_args(argv)
    prepare_comfy(args.comfy_tar)
    os.makedirs(args.work, exist_ok=True)
    if not args.tiny:
        if not args.models:
            raise SystemExit("--models is required without --tiny")
        prepare_models(args)
    report = {"bench": "e2e", "gpu": gpu_name(), "tiny": args.tiny, "seconds": args.seconds,
              "steps": args.steps, "plan": args.plan, "long_seconds": args.long_seconds,
              "attention": args.attention or "as in the workflow",
              "mode": "real ComfyUI server over HTTP + websocket", "cards": []}

    def save(partial: dict | None = None) -> None:  # after each run: a later failure keeps it
        with open(args.out, "w") as f:
            json.dump(dict(report, cards=report["cards"] + ([partial] if partial else [])), f,
                      indent=1)

    for card in (float(c) for c in args.cards.split(",")):
        report["cards"].append(run_card(args, card, save))
        save()
    print(json.dumps({"cards": [{k: v for k, v in c.items() if k != "trace"}
                                for c in report["cards"]]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
