"""Peak host memory of one load_model call, measured in a fresh process (tests/test_load_memory.py;
also run by hand on a 14B-shaped file).

`python tests/load_memory.py FILE QUANTIZATION streamed|old [--device D] [--compute-device C]
[--patch P] [--lora L] [--timeline]` loads FILE and prints one JSON line: the peak RSS above the
RSS the process had just before the call (VmHWM, with the high-water mark reset to the current RSS
first where the kernel allows it, so imports and CUDA's start do not count), the model's final
host bytes and its largest quantized layer; with --timeline also the RSS above that baseline over
the load (GB, the highest of each quarter second, sampled every 5 ms), which shows in which phase
a transient happens. `write_random_checkpoint` / `write_random_file` write the bf16 files
such a load reads, one tensor at a time, so the writer stays small too.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import struct
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _pack():
    sys.path.insert(0, os.path.join(ROOT, "wanvideo"))
    import _pack  # type: ignore

    sys.path.pop(0)
    return _pack.load_pack()


def write_random_file(path: str, shapes: dict, seed: int = 0, device: str = "cpu") -> int:
    """A bf16 safetensors file of random tensors (~1/sqrt(fan_in); vectors ~0.02); its size."""
    import torch

    header, cursor = {}, 0
    for key, shape in shapes.items():
        nbytes = 2 * math.prod(shape)
        header[key] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        cursor += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    gen = torch.Generator(device).manual_seed(seed)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for shape in shapes.values():
            scale = 1 / math.sqrt(math.prod(shape[1:])) if len(shape) >= 2 else 0.02
            t = torch.randn(shape, generator=gen, device=device).mul_(scale).bfloat16().cpu()
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return os.path.getsize(path)


def write_random_checkpoint(path: str, cfg, seed: int = 0, device: str = "cpu") -> int:
    """A bf16 Wan2.1 checkpoint of `cfg` (original key layout) with random weights."""
    from wanvideo_infinitetalk.wanvideo.loader import build_meta_model

    shapes = {k: tuple(v.shape) for k, v in build_meta_model(cfg).state_dict().items()}
    return write_random_file(path, shapes, seed, device)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss() -> int:
    """This process's RSS high-water mark (VmHWM). Not ru_maxrss: after fork + exec that also
    holds the parent's RSS (the kernel keeps the pre-exec peak), i.e. pytest's whole footprint."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _reset_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs sets the RSS high-water mark to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _host_bytes(model) -> int:
    seen = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type == "cpu":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


class _Timeline:
    """Samples the RSS every 5 ms in a thread; keeps the highest of each quarter second."""

    def __init__(self, before: int):
        import threading
        import time

        self.before, self.start, self.buckets = before, time.perf_counter(), {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        import time

        while not self.done.wait(0.005):
            slot = int((time.perf_counter() - self.start) * 4)
            self.buckets[slot] = max(self.buckets.get(slot, 0), _rss() - self.before)

    def stop(self) -> list[list[float]]:
        self.done.set()
        self.thread.join()
        return [[slot / 4, round(v / 1e9, 2)] for slot, v in sorted(self.buckets.items())]


def measure(path: str, quantization: str, mode: str, device: str = "cpu",
            compute_device: str | None = None, patch: str | None = None,
            lora: str | None = None, timeline: bool = False) -> dict:
    import time

    import torch

    _pack()
    from wanvideo_infinitetalk.multitalk.inject import apply_infinitetalk_from_checkpoints
    from wanvideo_infinitetalk.wanvideo.loader import load_model
    from wanvideo_infinitetalk.wanvideo.quant_linear import QuantLinear

    if "cuda" in (device, compute_device):
        torch.zeros(1, device="cuda")  # CUDA's own host memory is not the loader's
    gc.collect()
    reset = _reset_peak()
    before, start = _rss(), time.perf_counter()
    sampler = _Timeline(before) if timeline else None
    loaded = load_model(path, device=device, compute_device=compute_device, quantization=quantization,
                        patch=patch, loras=[(lora, 1.0)] if lora else (),
                        inject=apply_infinitetalk_from_checkpoints, _streamed=mode == "streamed")
    seconds = time.perf_counter() - start
    peak = _peak_rss()
    series = sampler.stop() if sampler else None
    layers = [m for m in loaded.model.modules() if isinstance(m, QuantLinear)]
    out = {"mode": mode, "quantization": quantization, "peak_reset": reset, "seconds": seconds,
            "peak_above_baseline": peak - before, "rss_after_above_baseline": _rss() - before,
            "final_bytes": _host_bytes(loaded.model), "quantized_layers": len(layers),
            "largest_fp32_layer": max((m.in_features * m.out_features * 4 for m in layers), default=0)}
    return dict(out, rss_timeline_gb=series) if series else out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("path")
    parser.add_argument("quantization")
    parser.add_argument("mode", choices=("streamed", "old"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compute-device")
    parser.add_argument("--patch")
    parser.add_argument("--lora")
    parser.add_argument("--timeline", action="store_true")
    args = parser.parse_args()
    print(json.dumps(measure(args.path, args.quantization, args.mode, args.device,
                             args.compute_device, args.patch, args.lora, args.timeline)))
