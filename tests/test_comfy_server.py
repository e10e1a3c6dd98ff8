"""The pack inside a real ComfyUI server: import, schemas, a loader workflow, and error paths."""
from __future__ import annotations

import json
import os
import re

import pytest

import comfy_harness as h

pytestmark = pytest.mark.comfy

OUR_NODES = ("WanVideoModelLoader", "WanVideoModelInfo")


def loader_info_graph(model: str, precision: str = "fp32") -> dict:
    """API-format graph: WanVideoModelLoader -> WanVideoModelInfo."""
    return {
        "1": {"class_type": "WanVideoModelLoader",
              "inputs": {"model": model, "base_precision": precision, "attention": "sdpa",
                         "load_device": "main_device"}},
        "2": {"class_type": "WanVideoModelInfo", "inputs": {"model": ["1", 0]}},
    }


def test_pack_imports_under_another_folder_name(comfy):
    assert os.path.basename(os.path.realpath(h.ROOT)) != h.PACK_NAME
    assert comfy.server.import_problems() == []
    info = comfy.object_info()
    for node in OUR_NODES:
        assert node in info
        assert h.PACK_NAME in info[node]["python_module"]
    assert set(h.expected_node_ids()) >= set(OUR_NODES)


def test_every_input_has_a_tooltip(comfy):
    info = comfy.object_info()
    ours = [n for n, v in info.items() if h.PACK_NAME in v.get("python_module", "")]
    assert sorted(ours) == sorted(h.expected_node_ids())
    for node in ours:
        spec = info[node]
        assert spec["category"] == "WanVideo InfiniteTalk"
        for section in ("required", "optional"):
            for name, decl in spec["input"].get(section, {}).items():
                opts = decl[1] if len(decl) > 1 else {}
                assert opts.get("tooltip"), f"{node}.{name} has no tooltip"


def test_loader_schema(comfy):
    spec = comfy.object_info("WanVideoModelLoader")["WanVideoModelLoader"]
    assert spec["display_name"] == "WanVideo Model Loader"
    req = spec["input"]["required"]
    assert list(req) == ["model", "base_precision", "attention", "load_device"]
    assert spec["output"] == ["WANVIDEOMODEL"]
    info = comfy.object_info("WanVideoModelInfo")["WanVideoModelInfo"]
    assert info["output_node"] is True and info["output"] == ["STRING"]


def test_unknown_model_name_is_rejected_before_running(comfy):
    with pytest.raises(h.PromptRejected) as e:
        comfy.queue(loader_info_graph("no_such_model.safetensors"))
    assert "1" in e.value.node_errors


def _info_json(entry: dict) -> dict:
    text = h.ui_output(entry, "2")["text"]
    return json.loads(text[0] if isinstance(text, list) else text)


def test_loader_info_workflow(comfy, tiny_models):
    name = os.path.basename(comfy.valid_model)
    entry = comfy.run(loader_info_graph(name), timeout=300)
    report = _info_json(entry)
    assert "model_type" in report and "config" in report
    assert report["device"] == "cpu"
    kinds = [m["type"] for m in entry["events"]]  # the websocket saw the whole run
    assert kinds[0] == "execution_start" and "execution_success" in kinds
    assert any(m["type"] == "executed" and m["data"]["node"] == "2" for m in entry["events"])
    assert comfy.rss_bytes() > 100 * 2**20
    # an interrupt with nothing running must not poison the next prompt
    comfy.interrupt()
    comfy.run(loader_info_graph(name, "fp16"), timeout=300)
    log = comfy.log_text()
    assert "WanVideo Model Loader" in log and "model_type" in log


BAD = {  # problem -> what the message must say (besides the file name)
    "not_wan": r"wan|unrecogni|unknown|not a|missing",
    "truncated": r"truncat|incomplete|corrupt|invalid|header|read|safetensors",
    "empty": r"empty|0 bytes|too small|header|invalid|safetensors",
    "missing_key": r"missing",
    "shape_mismatch": r"shape",
}


@pytest.mark.parametrize("problem", sorted(BAD))
def test_bad_checkpoint_fails_cleanly(comfy, tiny_models, problem):
    name = os.path.basename(comfy.bad[problem])
    entry = comfy.wait(comfy.queue(loader_info_graph(name)), timeout=300)
    err = h.execution_error(entry)
    assert err is not None, f"{problem}: expected an execution_error, got {entry['status']}"
    msg = err["exception_message"]
    assert name in msg, f"{problem}: message does not name the file: {msg}"
    assert re.search(BAD[problem], msg, re.I), f"{problem}: unclear message: {msg}"
    if problem in ("missing_key", "shape_mismatch"):
        assert comfy.bad["victim_key"] in msg, msg
    # the server is still healthy: a valid prompt right after succeeds
    comfy.run(loader_info_graph(os.path.basename(comfy.valid_model), "bf16"), timeout=300)


def test_every_tiny_layout_loads_through_the_node(comfy, tiny_models):
    """Each tiny file the generator writes (layouts, dtypes, fp8, shards) loads via the node."""
    models_dir = os.path.join(comfy.base, "models", "diffusion_models")
    names = sorted({os.path.relpath(p, models_dir) for p in tiny_models.values()
                    if os.path.realpath(p).startswith(os.path.realpath(models_dir) + os.sep)})
    assert len(names) >= 2, names
    for name in names:
        entry = comfy.run(loader_info_graph(name), timeout=300)
        report = _info_json(entry)
        expect = "t2v" if "t2v" in name else "i2v"
        assert report["model_type"] == expect, (name, report)
