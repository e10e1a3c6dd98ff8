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
# The ComfyUI harness, demo inputs and browser driver are tools in scripts/ that tests use too.
sys.path.insert(0, os.path.join(ROOT, "scripts"))


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


# ----------------------------------------------------------------------------- real ComfyUI server
# (scripts/comfy_harness.py does the work; these fixtures give it a session lifetime)

def _skip_unless_ci(reason: str):
    """Missing prerequisites skip locally but fail in CI, where setup must have provided them."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """A running ComfyUI (CPU) with this pack installed under another folder name and the tiny
    models in its base directory. Yields a ComfyClient; `comfy.models` maps names to files,
    `comfy.models_problem` says why the transformer models are missing (None when present),
    `comfy.bad` maps problems to broken checkpoints in diffusion_models."""
    import comfy_harness as h

    if not os.path.isfile(os.path.join(h.COMFY_DIR, "main.py")):
        _skip_unless_ci("ComfyUI is not extracted: run `make setup`")
    base = str(tmp_path_factory.mktemp("comfy_base"))
    models, problem = h.prepare_base(base)
    bad = {}
    valid = next((p for n, p in sorted(models.items())
                  if os.path.dirname(p).endswith("diffusion_models") and "i2v" in n), None)
    valid = valid or next((p for p in models.values()
                           if os.path.dirname(p).endswith("diffusion_models")), None)
    if valid:
        bad = h.write_bad_checkpoints(os.path.join(base, "models", "diffusion_models"), valid)
    server = h.ComfyServer(base).start()
    client = h.ComfyClient(server)
    client.base, client.models, client.models_problem, client.bad = base, models, problem, bad
    client.valid_model = valid
    try:
        problems = server.import_problems()
        assert not problems, "pack failed to import:\n" + "\n".join(problems) + \
            "\n" + server.log_text()[-4000:]
        info = client.object_info()
        missing = [n for n in h.expected_node_ids() if n not in info]
        assert not missing, f"nodes missing from /object_info: {missing}\n" + \
            server.log_text()[-4000:]
        yield client
    finally:
        client.close()
        server.stop()


@pytest.fixture
def tiny_models(comfy):
    """Skips the test when the tiny transformer generator is not there yet."""
    if comfy.models_problem or not comfy.valid_model:
        _skip_unless_ci(comfy.models_problem or "no tiny diffusion model was written")
    return comfy.models
