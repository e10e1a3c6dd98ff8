"""Drive a real ComfyUI server with this pack installed: prepare a base directory, start, talk HTTP
and websocket, stop. Used by the `comfy` pytest fixture, scripts/demo.py and `make serve`.

No pytest and no ComfyUI import here (the server is a child process). Command line:
  python scripts/comfy_harness.py prepare BASE          # symlink the pack, write the tiny models
  python scripts/comfy_harness.py serve BASE [--port P] # prepare, then run ComfyUI in the foreground
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY_DIR = os.path.join(ROOT, ".cache", "ComfyUI")
VENV_PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
# Deliberately unlike the repository folder's name: proves the pack works under any folder name.
PACK_NAME = "ComfyUI-WanVideo-InfiniteTalk"
TINY_VAE_NAME = "wan21_tiny_vae.safetensors"


class ComfyError(RuntimeError):
    pass


class PromptRejected(ComfyError):
    """POST /prompt refused the graph (HTTP 400 or non-empty node_errors)."""

    def __init__(self, message: str, error=None, node_errors=None):
        super().__init__(message)
        self.error = error
        self.node_errors = node_errors or {}


class ExecutionFailed(ComfyError):
    def __init__(self, message: str, entry: dict):
        super().__init__(message)
        self.entry = entry


# ----------------------------------------------------------------------------- base directory

def load_pack():
    """Import the pack under its test alias (same mechanism as tests/conftest.py)."""
    sys.path.insert(0, os.path.join(ROOT, "wanvideo"))
    try:
        import _pack  # type: ignore
    finally:
        sys.path.pop(0)
    return _pack.load_pack()


def expected_node_ids() -> list[str]:
    """Node ids declared by the pack's schemas, read from the source (not imported: that needs
    ComfyUI). A node whose schema breaks at runtime still shows up here, so a missing entry in
    /object_info is caught."""
    ids = []
    nodes_dir = os.path.join(ROOT, "nodes")
    for name in sorted(os.listdir(nodes_dir)):
        if name.endswith(".py"):
            with open(os.path.join(nodes_dir, name), encoding="utf-8") as f:
                ids += re.findall(r"node_id\s*=\s*[\"']([^\"']+)[\"']", f.read())
    return ids


def install_pack(base: str, pack_name: str = PACK_NAME) -> str:
    link = os.path.join(base, "custom_nodes", pack_name)
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if os.path.islink(link) and os.path.realpath(link) == os.path.realpath(ROOT):
        return link
    if os.path.lexists(link):
        os.remove(link) if os.path.islink(link) else shutil.rmtree(link)
    os.symlink(ROOT, link, target_is_directory=True)
    return link


def write_models(base: str) -> tuple[dict[str, str], str | None]:
    """Write the tiny models into BASE/models. Returns ({name: path}, problem): the transformer
    generators (wanvideo.tiny_models, multitalk.tiny) may not exist yet; `problem` says why
    nothing was written."""
    models = os.path.join(base, "models")
    load_pack()
    from wanvideo_infinitetalk.wanvideo.tiny_vae import write_tiny_wan_vae

    written = {"wan21_tiny_vae": write_tiny_wan_vae(os.path.join(models, "vae", TINY_VAE_NAME))}
    try:
        from wanvideo_infinitetalk.multitalk.tiny import write_all_tiny_models
    except ModuleNotFoundError as e:  # only its absence is tolerated; a broken module raises
        if not (e.name or "").endswith(("tiny_models", ".tiny")):
            raise
        return written, f"the tiny model generators are not available yet ({e})"
    written.update(write_all_tiny_models(models))
    return written, None


def write_bad_checkpoints(diffusion_dir: str, valid: str) -> dict[str, str]:
    """Broken variants of the valid checkpoint `valid`, for error-path tests. Returns
    {problem: path}: not_wan, truncated, empty, missing_key, shape_mismatch."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    os.makedirs(diffusion_dir, exist_ok=True)
    out = {k: os.path.join(diffusion_dir, f"bad_{k}.safetensors")
           for k in ("not_wan", "truncated", "empty", "missing_key", "shape_mismatch")}
    with safe_open(valid, "pt") as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    save_file({"first_stage_model.conv_in.weight": torch.zeros(8, 3, 3, 3),
               "cond_stage_model.proj": torch.zeros(4, 4)}, out["not_wan"])
    with open(valid, "rb") as f:
        data = f.read()
    with open(out["truncated"], "wb") as f:
        f.write(data[: len(data) // 2])
    open(out["empty"], "wb").close()
    # Damage the last block, away from the keys a config inference would read first.
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    prefix = f"blocks.{blocks[-1]}." if blocks else ""
    victims = sorted(k for k in sd if k.startswith(prefix) and k.endswith(".weight")
                     and sd[k].ndim == 2)
    victim = next((k for k in victims if "ffn.2" in k or ".o." in k), victims[-1])
    save_file({k: v for k, v in sd.items() if k != victim}, out["missing_key"])
    bad = dict(sd)
    t = sd[victim]
    bad[victim] = torch.zeros(t.shape[0], t.shape[1] + 1, dtype=t.dtype)
    save_file(bad, out["shape_mismatch"])
    out["victim_key"] = victim
    return out


def prepare_base(base: str, pack_name: str = PACK_NAME) -> tuple[dict[str, str], str | None]:
    base = os.path.abspath(base)
    for sub in ("custom_nodes", "models", "input", "output", "temp", "user/default"):
        os.makedirs(os.path.join(base, sub), exist_ok=True)
    settings = os.path.join(base, "user", "default", "comfy.settings.json")
    if not os.path.exists(settings):  # skip the first-run tutorial in a browser
        with open(settings, "w") as f:
            json.dump({"Comfy.TutorialCompleted": True}, f)
    install_pack(base, pack_name)
    return write_models(base)


# ----------------------------------------------------------------------------- server

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(base: str, port: int, python: str = None, cpu: bool = True,
                   extra: list[str] = ()) -> list[str]:
    cmd = [python or VENV_PYTHON, "main.py", "--listen", "127.0.0.1", "--port", str(port),
           "--disable-auto-launch", "--base-directory", os.path.abspath(base),
           "--disable-api-nodes", "--database-url", "sqlite:///:memory:", "--log-stdout"]
    return cmd + (["--cpu"] if cpu else []) + list(extra)


class ComfyServer:
    """A ComfyUI child process writing its log to BASE/comfyui.log."""

    def __init__(self, base: str, port: int | None = None, python: str | None = None,
                 cpu: bool = True, extra: list[str] = ()):
        self.base = os.path.abspath(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = os.path.join(self.base, "comfyui.log")
        self.cmd = server_command(self.base, self.port, python or sys.executable, cpu, extra)
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", DO_NOT_TRACK="1")
        # Two malloc arenas instead of one per thread (ComfyUI's executor, aiohttp, torch's
        # pool): freed frame buffers are reused instead of parked in an idle thread's heap, so
        # the server's RSS (which the memory tests compare across runs) shows what is kept.
        env.setdefault("MALLOC_ARENA_MAX", "2")
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=COMFY_DIR, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} during "
                                 f"start-up:\n{self.log_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.25)
        self.stop()
        raise ComfyError(f"ComfyUI not ready after {timeout:.0f}s:\n{self.log_text()[-4000:]}")

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def import_problems(self, pack_name: str = PACK_NAME) -> list[str]:
        """Log lines saying our pack failed to import."""
        return [line for line in self.log_text().splitlines()
                if pack_name in line and ("IMPORT FAILED" in line or "Cannot import" in line)]

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


# ----------------------------------------------------------------------------- client

TERMINAL = ("execution_success", "execution_error", "execution_interrupted")


class ComfyClient:
    """HTTP + websocket client. A background thread keeps one websocket open and files every
    message under its prompt_id, so nothing sent before wait() is called is lost."""

    def __init__(self, server: ComfyServer):
        self.server = server
        self.url = server.url
        self.client_id = uuid.uuid4().hex
        self.events: dict[str, list[dict]] = {}
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._ws = None
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()
        # ComfyUI drops messages for a client id with no open socket: connect before queueing.
        self._connected.wait(15)

    # -- plain HTTP
    def _request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw = r.read()
                return r.status, (json.loads(raw) if raw else None)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                return e.code, json.loads(raw)
            except ValueError:
                return e.code, {"error": raw.decode(errors="replace")}

    def get(self, path: str):
        status, body = self._request("GET", path)
        if status != 200:
            raise ComfyError(f"GET {path} -> HTTP {status}: {body}")
        return body

    def object_info(self, node: str | None = None) -> dict:
        return self.get("/object_info" + (f"/{node}" if node else ""))

    def queue(self, prompt: dict) -> str:
        status, body = self._request("POST", "/prompt",
                                     {"prompt": prompt, "client_id": self.client_id})
        body = body or {}
        if status != 200 or body.get("node_errors"):
            raise PromptRejected(f"prompt rejected (HTTP {status}): {body.get('error')} "
                                 f"node_errors={json.dumps(body.get('node_errors'))}",
                                 body.get("error"), body.get("node_errors"))
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", {})

    def log_text(self) -> str:
        return self.server.log_text()

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.server.proc.pid).memory_info().rss

    # -- websocket
    def _listen(self) -> None:
        import websocket  # websocket-client

        ws_url = self.url.replace("http://", "ws://") + f"/ws?clientId={self.client_id}"
        while not self._stop.is_set():
            try:
                self._ws = websocket.create_connection(ws_url, timeout=5)
                self._ws.settimeout(0.5)
                self._connected.set()
                while not self._stop.is_set():
                    try:
                        msg = self._ws.recv()
                    except websocket.WebSocketTimeoutException:
                        continue
                    if isinstance(msg, str):
                        self._file(json.loads(msg))
            except Exception:  # server restarting or gone: retry; wait() also polls /history
                if self._stop.wait(0.5):
                    break
            finally:
                if self._ws is not None:
                    try:
                        self._ws.close()
                    except Exception:
                        pass

    def _file(self, msg: dict) -> None:
        pid = (msg.get("data") or {}).get("prompt_id")
        if pid is None:
            return
        msg["received"] = time.monotonic()  # bench/e2e.py times stages from these
        with self._cond:
            self.events.setdefault(pid, []).append(msg)
            self._cond.notify_all()

    def messages(self, prompt_id: str, kind: str | None = None) -> list[dict]:
        with self._cond:
            msgs = list(self.events.get(prompt_id, []))
        return [m for m in msgs if kind is None or m.get("type") == kind]

    def wait(self, prompt_id: str, timeout: float = 120.0) -> dict:
        """Block until the prompt finishes; returns its /history entry plus `events` (the
        websocket messages: progress, executed, execution_error ...)."""
        deadline = time.monotonic() + timeout
        next_poll = 0.0
        while True:
            with self._cond:
                done = any(m.get("type") in TERMINAL for m in self.events.get(prompt_id, []))
            now = time.monotonic()
            if done or now >= next_poll:  # polling /history is the fallback without websocket
                entry = self.history(prompt_id)
                if entry and entry.get("status", {}).get("completed") is not None and (
                        done or entry["status"].get("status_str") in ("success", "error")):
                    entry = dict(entry)
                    entry["events"] = self.messages(prompt_id)
                    return entry
                next_poll = now + 1.0
            if now >= deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s; "
                                   f"log tail:\n{self.log_text()[-3000:]}")
            with self._cond:
                self._cond.wait(0.2)

    def wait_progress(self, prompt_id: str, node: str, timeout: float = 300.0) -> None:
        """Block until `node` of the prompt reports progress (e.g. a sampler's first step), so a
        test can interrupt or kill mid-run. Raises ComfyError when the prompt ends first and
        TimeoutError after `timeout`, each with the server log's tail."""
        deadline = time.monotonic() + timeout
        while True:
            msgs = self.messages(prompt_id)
            if any(m.get("type") == "progress" and (m.get("data") or {}).get("node") == node
                   for m in msgs):
                return
            if any(m.get("type") in TERMINAL for m in msgs):
                raise ComfyError(f"prompt {prompt_id} ended before node {node} reported "
                                 f"progress; log tail:\n{self.log_text()[-3000:]}")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"node {node} of prompt {prompt_id} reported no progress "
                                   f"after {timeout}s; log tail:\n{self.log_text()[-3000:]}")
            with self._cond:
                self._cond.wait(0.05)

    def run(self, prompt: dict, timeout: float = 120.0) -> dict:
        """queue + wait; raises ExecutionFailed with the error message unless it succeeded."""
        entry = self.wait(self.queue(prompt), timeout)
        err = execution_error(entry)
        if err is not None or entry["status"].get("status_str") != "success":
            raise ExecutionFailed(f"prompt failed: {err}", entry)
        return entry

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def execution_error(entry: dict) -> dict | None:
    """The execution_error data of a finished prompt (from websocket or /history), or None."""
    for m in entry.get("events", []):
        if m.get("type") == "execution_error":
            return m["data"]
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def ui_output(entry: dict, node_id: str) -> dict:
    return entry.get("outputs", {}).get(str(node_id), {})


# ----------------------------------------------------------------------------- command line

def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=["prepare", "serve"])
    p.add_argument("base")
    p.add_argument("--port", type=int, default=8188)
    p.add_argument("--gpu", action="store_true", help="do not pass --cpu to ComfyUI")
    a = p.parse_args(argv)
    written, problem = prepare_base(a.base)
    for name, path in sorted(written.items()):
        print(f"[harness] {name}: {path}")
    if problem:
        print(f"[harness] note: {problem}")
    if a.action == "serve":
        cmd = server_command(a.base, a.port, sys.executable, cpu=not a.gpu)
        print(f"[harness] serving on http://127.0.0.1:{a.port} (Ctrl-C stops)", flush=True)
        os.chdir(COMFY_DIR)
        os.execv(cmd[0], cmd)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
