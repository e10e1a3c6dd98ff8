"""Run test code on CPU tensors through Triton's interpreter (a helper, not a test module).

TRITON_INTERPRET must be set before triton is first imported, so the code runs in a fresh
process, from the tests folder (it can import conftest and the test modules)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run(code: str) -> None:
    """Run `code` (after `import conftest, torch`) under TRITON_INTERPRET=1; fail with its
    output when it fails; skip without triton."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([sys.executable, "-c", "import conftest, torch\n" + code], cwd=HERE,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
