"""Run inside a child process with cwd = .cache/ComfyUI (tests/test_full_size_stand_ins.py):
ComfyUI's own classes, built on the meta device, report the keys, shapes and dtypes they expect,
and ComfyUI's own loaders load full-size stand-in files. Prints one `RESULT <json>` line.
Not a test module: ComfyUI's top-level packages must not leak into the test session."""
import json
import os
import sys
import time

MODE, ARG = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[:1]  # ComfyUI parses the command line on import
import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True
import torch  # noqa: E402


def described(sd, strip=""):
    """key -> [shape, dtype] of the keys under `strip` (ComfyUI's wrapper adds its own)."""
    return {k[len(strip):]: [list(v.shape), str(v.dtype)] for k, v in sd.items()
            if k.startswith(strip)}


def expected_layouts():
    import comfy.clip_vision, comfy.ldm.wan.vae, comfy.model_detection, comfy.ops  # noqa: E401
    import comfy.ldm.wan.model, comfy.text_encoders.wan  # noqa: E401
    with open(ARG) as f:
        wan_shapes = json.load(f)  # key -> shape of our stand-in, for ComfyUI's detection
    sd = {k: torch.empty(s, device="meta") for k, s in wan_shapes.items()}
    unet = comfy.model_detection.detect_unet_config(sd, "model.diffusion_model.")
    with torch.device("meta"):
        te = comfy.text_encoders.wan.te(dtype_t5=torch.bfloat16,
                                        t5xxl_scaled_fp8=torch.float8_e4m3fn)(device="meta")
        clip = comfy.clip_vision.ClipVisionModel(os.path.join(
            os.path.dirname(comfy.clip_vision.__file__), "clip_vision_config_h.json"))
        vae = comfy.ldm.wan.vae.WanVAE(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                       attn_scales=[], temperal_downsample=[False, True, True])
        wan = comfy.ldm.wan.model.WanModel(
            **{k: v for k, v in unet.items() if k != "image_model"},
            device="meta", operations=comfy.ops.manual_cast)
    return {"unet_config": {k: str(v) for k, v in unet.items()},
            "umt5": described(te.state_dict(), "umt5xxl.transformer."),
            "clip_vision_h": described(clip.model.state_dict()),
            "vae": described(vae.state_dict()), "wan": described(wan.state_dict())}


def load_full_size():
    import comfy.clip_vision, comfy.sd, comfy.utils  # noqa: E401
    clip_path, vae_path = ARG.split(os.pathsep)
    out, start = {}, time.perf_counter()
    clip = comfy.clip_vision.load(clip_path)
    on_file = set(comfy.utils.load_torch_file(clip_path))
    out["clip_missing"] = sorted(set(clip.model.state_dict()) - on_file)
    out["clip_seconds"] = round(time.perf_counter() - start, 1)
    start = time.perf_counter()
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(vae_path))
    out["vae_class"] = type(vae.first_stage_model).__module__
    torch.manual_seed(0)
    latent = vae.encode(torch.rand(5, 32, 32, 3))
    images = vae.decode(latent)
    out.update(latent=list(latent.shape), images=list(images.shape),
               finite=bool(torch.isfinite(latent).all() and torch.isfinite(images).all()),
               vae_seconds=round(time.perf_counter() - start, 1))
    return out


if __name__ == "__main__":
    what = {"layouts": expected_layouts, "load": load_full_size}[MODE]
    print("RESULT " + json.dumps(what()))
