"""End-to-end demo: a real ComfyUI with this pack and tiny models, driven over HTTP.

  python scripts/demo.py                      # example_workflows/infinitetalk_tiny_demo.json
  python scripts/demo.py --workflow G.json    # any workflow, UI format (converted in the browser)
                                              # or API format
  python scripts/demo.py --keep-running       # leave the server up afterwards (Ctrl-C stops)

It prepares a base directory under .cache/demo (the pack symlinked into custom_nodes, tiny models
in models/, a synthetic portrait and an espeak-ng speech WAV in input/, cached text embeddings),
starts ComfyUI, converts the UI workflow to the API format with the real frontend in chromium
(scripts/browser/frontend.mjs; without a browser it uses the API twin in example_workflows/api/),
queues it, prints progress as it arrives, then reports the MP4 it wrote (frames, duration, audio)
and stops the server.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import comfy_harness as h  # noqa: E402
import demo_assets  # noqa: E402

BASE = os.path.join(ROOT, ".cache", "demo")
TINY_WORKFLOW = os.path.join(ROOT, "example_workflows", "infinitetalk_tiny_demo.json")


def read_workflow(path: str | None) -> dict:
    """The JSON of `path` (default: the tiny demo workflow, UI format)."""
    with open(path or TINY_WORKFLOW, encoding="utf-8") as f:
        return json.load(f)


def is_ui_format(graph: dict) -> bool:
    return "nodes" in graph and "links" in graph


def api_twin(path: str) -> str:
    return os.path.join(os.path.dirname(path), "api", os.path.basename(path))


def to_api(graph: dict, path: str | None, url: str) -> dict:
    """API format for POST /prompt: converted by the real frontend (what the Run button sends);
    without a browser, the stored API twin that scripts/make_workflows.py wrote beside it."""
    if not is_ui_format(graph):
        return graph.get("prompt", graph)
    from frontend_client import Frontend, FrontendError, unavailable_reason

    path = path or TINY_WORKFLOW
    reason = unavailable_reason()
    if reason is None:
        t0 = time.monotonic()
        try:
            with Frontend(url) as fe:
                api = fe.ui_to_api(graph)
            print(f"[demo] converted {os.path.relpath(path, ROOT)} to API format in the ComfyUI "
                  f"frontend (chromium) in {time.monotonic() - t0:.1f}s")
            return api
        except FrontendError as e:
            reason = str(e).splitlines()[0]
    twin = api_twin(path)
    if not os.path.isfile(twin):
        raise SystemExit(f"{path} is a UI-format workflow and the browser converter is not "
                         f"available ({reason}); export it as API format (Workflow > Export (API))")
    print(f"[demo] browser converter not available ({reason}); using {os.path.relpath(twin, ROOT)}")
    with open(twin, encoding="utf-8") as f:
        return json.load(f)


def describe(msg: dict, graph: dict) -> str | None:
    kind, data = msg.get("type"), msg.get("data") or {}
    node = data.get("node")
    label = f"{node} ({graph[node]['class_type']})" if node in graph else str(node)
    if kind == "execution_start":
        return "started"
    if kind == "execution_cached" and data.get("nodes"):
        return f"cached: {', '.join(data['nodes'])}"
    if kind == "progress_state":
        running = [n for n, st in (data.get("nodes") or {}).items() if st.get("state") == "running"]
        return "".join(f"running {n} ({graph.get(n, {}).get('class_type')})" for n in running[:1]) or None
    if kind == "progress":
        return f"  {label}: {data.get('value')}/{data.get('max')}"
    if kind == "executed":
        return f"finished {label}"
    if kind == "execution_success":
        return "success"
    if kind == "execution_error":
        return f"ERROR in {label}: {data.get('exception_type')}: {data.get('exception_message')}"
    if kind == "execution_interrupted":
        return "interrupted"
    return None


def follow(client: h.ComfyClient, prompt_id: str, graph: dict, timeout: float) -> dict:
    """Print the prompt's websocket messages as they arrive; return its history entry."""
    seen, shown, deadline = 0, set(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        msgs = client.messages(prompt_id)
        for m in msgs[seen:]:
            line = describe(m, graph)
            if line and line not in shown:  # progress_state repeats "running N" with each step
                shown.add(line)
                print(f"[demo] {line}", flush=True)
        seen = len(msgs)
        if any(m.get("type") in h.TERMINAL for m in msgs):
            break
        time.sleep(0.1)
    return client.wait(prompt_id, timeout=max(1.0, deadline - time.monotonic()))


def print_outputs(entry: dict, graph: dict) -> None:
    for node, out in sorted(entry.get("outputs", {}).items()):
        for text in out.get("text", []):
            print(f"[demo] {node} ({graph.get(node, {}).get('class_type')}) reported:")
            print(text)


def loader_log_lines(log: str) -> list[str]:
    """The loader's INFO lines: its headline and the indented detail lines that follow it."""
    lines, taking = [], False
    for line in log.splitlines():
        if "WanVideo Model Loader:" in line or line.startswith("WanVideo loader:"):
            taking = True
            lines.append(line)
        elif taking and line.startswith("  ") and ": " in line:
            lines.append(line)
        else:
            taking = False
    return lines


def saved_videos(entry: dict, base: str) -> list[str]:
    """Files that SaveVideo (or any node reporting output files) wrote, as paths."""
    out = []
    for node_out in entry.get("outputs", {}).values():
        for item in node_out.get("images", []) + node_out.get("videos", []):
            if isinstance(item, dict) and item.get("type") == "output" and \
                    str(item.get("filename", "")).endswith((".mp4", ".webm", ".mov")):
                out.append(os.path.join(base, "output", item.get("subfolder", ""), item["filename"]))
    return out


def video_stats(path: str) -> dict:
    """Frames, fps, duration and the audio stream of a video file (PyAV)."""
    import av

    with av.open(path) as c:
        v = c.streams.video[0]
        frames = sum(1 for _ in c.decode(video=0))
        fps = float(v.average_rate or 0)
        stats = {"frames": frames, "fps": fps, "width": v.width, "height": v.height,
                 "seconds": frames / fps if fps else None, "audio": None}
    with av.open(path) as c:
        if c.streams.audio:
            a = c.streams.audio[0]
            samples = sum(f.samples for f in c.decode(audio=0))
            stats["audio"] = {"codec": a.codec_context.name, "sample_rate": a.sample_rate,
                              "channels": a.channels,
                              "seconds": float(a.duration * a.time_base) if a.duration
                              else samples / a.sample_rate}
    return stats


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Run a workflow through a real ComfyUI with this pack.")
    p.add_argument("--workflow", help="workflow JSON, UI or API format (default: "
                   "example_workflows/infinitetalk_tiny_demo.json)")
    p.add_argument("--base", default=BASE, help="ComfyUI base directory (default .cache/demo)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (no --cpu)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--keep-running", action="store_true")
    a = p.parse_args(argv)

    source = read_workflow(a.workflow)
    print(f"[demo] preparing {a.base}", flush=True)
    written, problem = h.prepare_base(a.base)
    if problem:
        print(f"[demo] cannot write the tiny transformer: {problem}")
        return 2
    models = os.path.join(os.path.abspath(a.base), "models")
    print(f"[demo] tiny models in {models}: "
          f"{', '.join(sorted({os.path.relpath(x, models) for x in written.values()}))}")
    inputs = demo_assets.prepare_demo_inputs(a.base)
    print(f"[demo] portrait {inputs['portrait']}, speech {inputs['speech']} "
          f"({demo_assets.wav_seconds(inputs['speech']):.2f} s), text embeds {inputs['embeds']}")
    server = h.ComfyServer(a.base, port=a.port or None, cpu=not a.gpu)
    print(f"[demo] starting ComfyUI on {server.url} (log: {server.log_path})", flush=True)
    t0 = time.monotonic()
    server.start()
    client = h.ComfyClient(server)
    try:
        problems = server.import_problems()
        if problems:
            print("[demo] the pack failed to import:\n" + "\n".join(problems))
            return 1
        print(f"[demo] ready in {time.monotonic() - t0:.1f}s", flush=True)
        graph = to_api(source, a.workflow, server.url)
        print(f"[demo] queueing {len(graph)} nodes", flush=True)
        t_run = time.monotonic()
        try:
            prompt_id = client.queue(graph)
        except h.PromptRejected as e:
            print(f"[demo] rejected: {e}")
            return 1
        entry = follow(client, prompt_id, graph, a.timeout)
        run_seconds = time.monotonic() - t_run
        for line in loader_log_lines(client.log_text()):
            print(f"[demo] log: {line}")
        print_outputs(entry, graph)
        ok = entry["status"].get("status_str") == "success"
        for path in saved_videos(entry, server.base):
            st = video_stats(path)
            au = st["audio"]
            print(f"[demo] video: {path}")
            print(f"[demo]   {st['frames']} frames {st['width']}x{st['height']} at {st['fps']:g} fps "
                  f"= {st['seconds']:.2f} s; audio: " + (
                      f"{au['codec']} {au['sample_rate']} Hz x{au['channels']}, {au['seconds']:.2f} s"
                      if au else "none"))
        print(f"[demo] {'done' if ok else 'FAILED'}: run {run_seconds:.1f}s, total "
              f"{time.monotonic() - t0:.1f}s; server RSS {client.rss_bytes() / 2**20:.0f} MiB")
        if a.keep_running:
            print(f"[demo] server still running on {server.url}; Ctrl-C stops it")
            try:
                server.proc.wait()
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        client.close()
        server.stop()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
