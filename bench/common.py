"""Shared pieces of the GPU benchmarks: a 14B-shaped Wan2.1 I2V + InfiniteTalk model built from
random weights (no file), made on the GPU for speed and stored where the caller asks."""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import sys
from collections.abc import Mapping

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "wanvideo"))
import _pack  # noqa: E402

sys.path.pop(0)
_pack.load_pack()
from wanvideo_infinitetalk import fp8_optimization  # noqa: E402
from wanvideo_infinitetalk.multitalk.inject import inject_infinitetalk  # noqa: E402
from wanvideo_infinitetalk.multitalk.tiny import infinitetalk_shapes  # noqa: E402
from wanvideo_infinitetalk.wanvideo import attention_int8, placement  # noqa: E402
from wanvideo_infinitetalk.wanvideo.config import WanConfig  # noqa: E402
from wanvideo_infinitetalk.wanvideo.loader import build_meta_model, storage_dtype_policy  # noqa: E402


class RandomWeights(Mapping):
    """Random tensors made on the GPU on access (fast), shaped like `shapes`."""

    def __init__(self, shapes: dict, device):
        self.shapes, self.device = shapes, device

    def __getitem__(self, key):
        shape = self.shapes[key]
        if len(shape) >= 2:
            return torch.randn(shape, device=self.device).mul_(1 / math.sqrt(math.prod(shape[1:])))
        if key.endswith("weight"):
            return 1 + 0.02 * torch.randn(shape, device=self.device)
        return 0.02 * torch.randn(shape, device=self.device)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self):
        return len(self.shapes)


# The shared GPU hosts forbid NVLink multicast (it can take the GPUs out of service).
NO_MULTICAST_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                    "NVSHMEM_DISABLE_NVLS": "1"}


def forbid_multicast() -> None:
    """Set NO_MULTICAST_ENV (unless already set) before spawning ranks: they inherit it."""
    for key, value in NO_MULTICAST_ENV.items():
        os.environ.setdefault(key, value)


def build(blocks: int, quant: str, dim: int = 5120, ffn: int = 13824, device="cuda",
          storage="cpu", seed: int = 0, **quant_options):
    """Random-weight model with InfiniteTalk layers; `quant` as fp8_optimization.quantize_model;
    weights stored on `storage` (host RAM for BlockSwap, the GPU for resident runs)."""
    torch.manual_seed(seed)
    cfg = WanConfig(dim=dim, ffn_dim=ffn, num_heads=dim // 128, num_layers=blocks, in_dim=36,
                    out_dim=16, has_image_embedding=True)
    model = build_meta_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    placement.materialize(model, RandomWeights(shapes, device), torch.device(storage),
                          dtype_for=storage_dtype_policy(torch.bfloat16))
    model.compute_dtype = torch.bfloat16
    model.eval().requires_grad_(False)
    inject_infinitetalk(model, RandomWeights(infinitetalk_shapes(cfg.dim, blocks), device), storage,
                        where="random InfiniteTalk", dtype=torch.bfloat16)
    if quant != "none":
        fp8_optimization.quantize_model(model, quant, torch.device(device), storage_device=storage,
                                        compute_dtype=torch.bfloat16, **quant_options)
    return model


def cuda_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Mean ms per call of `fn` on the current CUDA stream (CUDA events, after warm-up)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def emit(result: dict, out: str | None) -> None:
    """Print the benchmark's one JSON object, and write it to `out` when given."""
    text = json.dumps(result, indent=1, default=str)
    if out:
        with open(out, "w") as f:
            f.write(text)
    print(text)


@contextlib.contextmanager
def attention_spec(spec: str):
    """An attention backend name for model.set_attention; "int8@N" is the 8-bit backend with
    attention_int8.SWEEP[N] as its launch settings instead of the device default,
    "int8@unpaired" the default with the CUDA kernel's CTA pairs off (no K/V multicast at any
    length), "<name>@tensorwise" the fp8 layers' inputs all scaled per tensor (no per-row
    inputs written by the norms or the GELU quantization), "<name>@norms-tensorwise" only
    the norms' outputs so, "<name>@rows" every dynamic fp8 input per row
    (quant_linear.DYNAMIC_ROWS, the default), "<name>@dynamic-tensorwise" per tensor where no
    writing kernel folds the rows (DYNAMIC_ROWS off), "<name>@rope-gather" the RMSNorm + RoPE
    kernel's general rotation path and warp count (before the thirteenth session),
    "<name>@norm-warps16" the LayerNorm / residual kernel's older warp count (16 for 5,120
    channels), "<name>@cuda:OPTIONS" the CUDA kernel with other source options
    (cuda_switches, e.g. "int8@cuda:preset_lds=0+pingpong=1"), so one run can time the default
    and a candidate side by side. Switches combine:
    "int8@rope-gather@dynamic-tensorwise"."""
    name, _, index = spec.partition("@")
    if not index:
        yield spec
        return
    parts = index.split("@")   # several switches: "int8@rope-gather@dynamic-tensorwise"
    if all(part in SWITCHES or part.startswith("cuda:") for part in parts):
        with patched([patch for part in parts for patch in _switches(part)]):
            yield name
        return
    chosen = dict(attention_int8.SWEEP[int(index)])
    with patched([(attention_int8, "default_config",
                   lambda device, head_dim, cuda=True: dict(chosen))]):
        yield name


SWITCHES = ("unpaired", "tensorwise", "norms-tensorwise", "rows", "dynamic-tensorwise",
            "rope-gather", "norm-warps16")


def cuda_switches(text: str) -> list:
    """(module, name, value) patches for "key=0|1,..." ("+" may stand for "," where a list
    of backends is comma-separated): attention_int8_cuda_source.source
    options every bf16 launch takes (attention_int8_cuda.KERNEL_OPTIONS), and v_direct, V read
    as it is, without quantize_kv's V^T (attention_int8_cuda.V_DIRECT)."""
    from wanvideo_infinitetalk.wanvideo import attention_int8_cuda, attention_int8_cuda_source

    allowed = set(inspect.signature(attention_int8_cuda_source.source).parameters) - {
        "stages", "diag", "pv_int8", "pv8_overlap"}
    options, patches = dict(attention_int8_cuda.KERNEL_OPTIONS), []
    for part in filter(None, text.replace("+", ",").split(",")):
        key, _, value = part.partition("=")
        if key not in allowed | {"v_direct"} or value not in ("0", "1"):
            raise ValueError(f"{part!r}: expected key=0 or key=1 with key in "
                             f"{sorted(allowed | {'v_direct'})}")
        if key == "v_direct":
            patches.append((attention_int8_cuda, "V_DIRECT", value == "1"))
        else:
            options[key] = value == "1"
    return patches + [(attention_int8_cuda, "KERNEL_OPTIONS", options)]


def with_cuda_switches(fn, text: str):
    """fn, run under cuda_switches(text) at every call."""
    def call():
        with patched(cuda_switches(text)):
            return fn()
    return call


@contextlib.contextmanager
def patched(patches: list):
    """(module, name, value) patches applied for the with-block, the old values restored."""
    saved = [(mod, key, getattr(mod, key)) for mod, key, _ in patches]
    for mod, key, value in patches:
        setattr(mod, key, value)
    try:
        yield
    finally:
        for mod, key, old in reversed(saved):
            setattr(mod, key, old)


def _switches(what: str) -> list:
    """The patches of attention_spec's switches (its docstring)."""
    from wanvideo_infinitetalk.wanvideo import (attention_int8_cuda, fused_ops, model,
                                                quant_kernels, quant_linear)

    if what == "unpaired":
        return [(attention_int8_cuda, "MULTICAST_MIN_KEYS", float("inf"))]
    if what in ("rows", "dynamic-tensorwise"):
        return [(quant_linear, "DYNAMIC_ROWS", what == "rows")]
    if what == "rope-gather":
        return [(fused_ops, "_rope_plan", lambda block, head_half: (0, fused_ops._warps(block)))]
    if what == "norm-warps16":
        return [(fused_ops, "_norm_warps", lambda block, fp8_rows: fused_ops._warps(block))]
    if what.startswith("cuda:"):
        return cuda_switches(what[len("cuda:"):])
    patches = [(model, "fp8_rows_input", lambda layers, x: False)]
    if what == "tensorwise":
        patches.append((quant_kernels, "ROWS_MAX_K", 0))
    return patches
