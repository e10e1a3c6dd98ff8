"""The tiny Wan 2.1 VAE has the real key layout and runs through ComfyUI's own VAE class.

ComfyUI is imported in a child process: its top-level packages (utils, app, comfy ...) and its
device probing must not leak into the test session.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from wanvideo_infinitetalk.wanvideo import tiny_vae

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMFY = os.path.join(ROOT, ".cache", "ComfyUI")

CHILD = r"""
import json, sys
sys.argv = [sys.argv[0]]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import torch, comfy.sd, comfy.utils, comfy.ldm.wan.vae as wan_vae
path, dim = sys.argv_path, sys.argv_dim
sd = comfy.utils.load_torch_file(path)
ref = wan_vae.WanVAE(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                     attn_scales=[], temperal_downsample=[False, True, True]).state_dict()
mine = {k: list(v.shape) for k, v in sd.items()}
theirs = {k: list(v.shape) for k, v in ref.items()}
vae = comfy.sd.VAE(sd=sd)
torch.manual_seed(0)
video = torch.rand(5, 64, 64, 3)
latent = vae.encode(video)
images = vae.decode(latent)
print("RESULT " + json.dumps({
    "missing": sorted(set(theirs) - set(mine)), "unexpected": sorted(set(mine) - set(theirs)),
    "mismatch": sorted(k for k in mine if k in theirs and mine[k] != theirs[k]),
    "cls": type(vae.first_stage_model).__module__, "latent": list(latent.shape),
    "latent_finite": bool(torch.isfinite(latent).all()), "images": list(images.shape),
    "images_finite": bool(torch.isfinite(images).all()),
}))
"""


def test_shapes_are_deterministic_and_scaled_by_dim():
    a = tiny_vae.tiny_wan21_vae_state_dict(dim=8, seed=0)
    b = tiny_vae.tiny_wan21_vae_state_dict(dim=8, seed=0)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert tuple(a["decoder.head.0.gamma"].shape) == (8, 1, 1, 1)
    assert tuple(a["decoder.conv1.weight"].shape) == (32, 16, 3, 3, 3)
    assert tuple(a["conv1.weight"].shape) == (32, 32, 1, 1, 1)
    assert not tiny_vae.tiny_wan21_vae_state_dict(dim=8, seed=1)["conv1.weight"].equal(
        a["conv1.weight"])


@pytest.mark.skipif(not os.path.isfile(os.path.join(COMFY, "comfy", "sd.py")),
                    reason="ComfyUI not extracted (run scripts/setup.sh)")
def test_loads_and_runs_through_comfyui_vae(tmp_path):
    dim = 8  # the default
    path = tiny_vae.write_tiny_wan_vae(str(tmp_path / "wan21_tiny_vae.safetensors"))
    code = f"import sys; sys.argv_path = {path!r}; sys.argv_dim = {dim}\n" + CHILD
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-c", code], cwd=COMFY, env=env,
                          capture_output=True, text=True, timeout=180)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert r["missing"] == [] and r["unexpected"] == [] and r["mismatch"] == [], r
    assert r["cls"] == "comfy.ldm.wan.vae"  # the Wan 2.1 VAE, not 2.2
    assert r["latent"] == [1, 16, 2, 8, 8] and r["latent_finite"]
    frames = r["images"]
    assert frames[-3:] == [64, 64, 3] and frames[0] * (frames[1] if len(frames) == 5 else 1) == 5
    assert r["images_finite"]
