"""End-to-end demo: a real ComfyUI with this pack and tiny models, driven over HTTP.

  python scripts/demo.py                      # the built-in workflow (see `default_workflow`)
  python scripts/demo.py --workflow G.json    # any API-format graph
  python scripts/demo.py --keep-running       # leave the server up afterwards (Ctrl-C stops)

It prepares a base directory under .cache/demo (the pack symlinked into custom_nodes, tiny models
in models/), starts ComfyUI, queues the graph, prints progress as it arrives and what each node
reported, then stops the server. To demo another pipeline, change `default_workflow` or pass a file.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import comfy_harness as h  # noqa: E402

BASE = os.path.join(ROOT, ".cache", "demo")
TINY_MODEL = "wan21_tiny_i2v.safetensors"


def default_workflow() -> dict:
    """API-format graph: load the tiny InfiniteTalk-ready transformer and show what was detected."""
    return {
        "1": {"class_type": "WanVideoModelLoader",
              "inputs": {"model": TINY_MODEL, "base_precision": "bf16", "attention": "sdpa",
                         "load_device": "main_device"}},
        "2": {"class_type": "WanVideoModelInfo", "inputs": {"model": ["1", 0]}},
    }


def load_workflow(path: str | None) -> dict:
    if path is None:
        return default_workflow()
    with open(path, encoding="utf-8") as f:
        graph = json.load(f)
    if "nodes" in graph and "links" in graph:
        raise SystemExit(f"{path} is a UI-format workflow; POST /prompt needs the API format "
                         "(in ComfyUI: Workflow > Export (API))")
    return graph.get("prompt", graph)


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
    seen, last, deadline = 0, None, time.monotonic() + timeout
    while time.monotonic() < deadline:
        msgs = client.messages(prompt_id)
        for m in msgs[seen:]:
            line = describe(m, graph)
            if line and line != last:
                last = line
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


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="Run a workflow through a real ComfyUI with this pack.")
    p.add_argument("--workflow", help="API-format graph JSON (default: the built-in demo graph)")
    p.add_argument("--base", default=BASE, help="ComfyUI base directory (default .cache/demo)")
    p.add_argument("--port", type=int, default=0, help="port (default: a free one)")
    p.add_argument("--gpu", action="store_true", help="let ComfyUI use the GPU (no --cpu)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--keep-running", action="store_true")
    a = p.parse_args(argv)

    graph = load_workflow(a.workflow)
    print(f"[demo] preparing {a.base}", flush=True)
    written, problem = h.prepare_base(a.base)
    if problem:
        print(f"[demo] cannot write the tiny transformer: {problem}")
        return 2
    models = os.path.join(os.path.abspath(a.base), "models")
    print(f"[demo] tiny models in {models}: "
          f"{', '.join(sorted({os.path.relpath(x, models) for x in written.values()}))}")
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
        print(f"[demo] ready in {time.monotonic() - t0:.1f}s; queueing {len(graph)} nodes")
        try:
            prompt_id = client.queue(graph)
        except h.PromptRejected as e:
            print(f"[demo] rejected: {e}")
            return 1
        entry = follow(client, prompt_id, graph, a.timeout)
        for line in loader_log_lines(client.log_text()):
            print(f"[demo] log: {line}")
        print_outputs(entry, graph)
        ok = entry["status"].get("status_str") == "success"
        print(f"[demo] {'done' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s; "
              f"server RSS {client.rss_bytes() / 2**20:.0f} MiB")
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
