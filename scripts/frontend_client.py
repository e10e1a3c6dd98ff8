"""Python side of scripts/browser/frontend.mjs: the real ComfyUI frontend of a running server in
Debian's chromium, one page kept open, commands sent as JSON lines.

    with Frontend(server.url) as fe:
        api = fe.ui_to_api(ui_workflow)          # what the Run button would send
        ui = fe.api_to_ui(api_graph)             # app.loadApiJson + app.graph.serialize()

No pytest and no ComfyUI import here; used by tests/test_browser.py, scripts/make_workflows.py and
scripts/demo.py.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "browser", "frontend.mjs")
NODE_DIR = os.path.join(ROOT, ".cache", "node")
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


class FrontendError(RuntimeError):
    pass


def unavailable_reason() -> str | None:
    """Why the browser cannot be driven here (None when it can)."""
    if shutil.which("node") is None:
        return "node (Node.js) is not installed"
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is missing: `apt-get install chromium` (scripts/setup.sh does it)"
    if not os.path.isdir(os.path.join(NODE_DIR, "node_modules", "playwright-core")):
        return f"playwright-core is not installed in {NODE_DIR}: run `make setup`"
    return None


class Frontend:
    def __init__(self, url: str, timeout: float = 120.0):
        reason = unavailable_reason()
        if reason:
            raise FrontendError(reason)
        self.timeout = timeout
        self.stderr: list[str] = []
        self.proc = subprocess.Popen(["node", SCRIPT, url], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     cwd=ROOT, env=dict(os.environ, CHROMIUM=CHROMIUM))
        self._err = threading.Thread(target=self._drain, daemon=True)
        self._err.start()

    def _drain(self) -> None:
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip())

    def call(self, cmd: str, **args) -> dict:
        """Send one command; returns its result dict (raises FrontendError on {"ok": false})."""
        if self.proc.poll() is not None:
            raise FrontendError(f"frontend driver exited ({self.proc.returncode}): "
                                + "\n".join(self.stderr[-30:]))
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(self.timeout)
        if not result or not result[0]:
            raise FrontendError(f"no answer to {cmd!r} within {self.timeout:.0f}s:\n"
                                + "\n".join(self.stderr[-30:]))
        out = json.loads(result[0])
        if not out.pop("ok", False):
            raise FrontendError(f"{cmd}: {out.get('error')}")
        return out

    # -- conveniences
    def load_ui(self, workflow: dict) -> dict:
        return self.call("load_ui", workflow=workflow)

    def ui_to_api(self, workflow: dict) -> dict:
        out = self.load_ui(workflow)
        if out["missing"]:
            raise FrontendError(f"node types unknown to the frontend: {out['missing']}")
        return out["prompt"]

    def api_to_ui(self, api: dict, positions=None, sizes=None, notes=None, title=None) -> dict:
        return self.call("api_to_ui", api=api, positions=positions or {}, sizes=sizes or {},
                         notes=notes or [], title=title)["workflow"]

    def queue(self) -> dict:
        return self.call("queue")

    def screenshot(self, path: str) -> str:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return self.call("screenshot", path=os.path.abspath(path))["path"]

    def console(self) -> list[str]:
        return self.call("console")["messages"]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(20)
            except (subprocess.TimeoutExpired, BrokenPipeError, OSError):
                self.proc.kill()
                self.proc.wait(10)

    def __enter__(self) -> "Frontend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
