"""Test setup: import the pack as a package under a fixed alias, whatever its folder is called."""
from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "wanvideo"))  # noqa: E402  (only for _pack below)
import _pack  # type: ignore  # noqa: E402

sys.path.pop(0)
PACK = _pack.load_pack()  # importable as `wanvideo_infinitetalk` in every test


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU)")
    config.addinivalue_line("markers", "comfy: starts a real ComfyUI server")
    # Tests run the layout checker after every move.
    os.environ.setdefault("WANVIDEO_CHECK_LAYOUT", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
