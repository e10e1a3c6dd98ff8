"""The model diagnostic behind `python -m wanvideo.inspect`: one JSON object on stdout, or one
clear line on stderr and exit code 1 when the input is unusable."""
from __future__ import annotations

import argparse
import json
import sys

from .loader import BASE_DTYPES, LayerInjector, load_model


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wanvideo.inspect",
                                description="Load a Wan2.1 checkpoint and report what was detected.")
    p.add_argument("checkpoint", nargs="+", help="a .safetensors file, a shard of a set, or a folder")
    p.add_argument("--patch", help="an InfiniteTalk patch file to inject")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="bf16", choices=sorted(BASE_DTYPES), help="base precision")
    p.add_argument("--attention", default="sdpa", help="attention backend to validate")
    return p


def inspect(paths, patch=None, device="cpu", dtype="bf16", attention="sdpa",
            inject: LayerInjector | None = None) -> dict:
    loaded = load_model(paths if len(paths) > 1 else paths[0], device=device, base_dtype=dtype,
                        attention=attention, patch=patch, inject=inject)
    return loaded.report


def main(argv=None, inject: LayerInjector | None = None) -> int:
    """`inject`: the InfiniteTalk injector (see loader.load_model), handed in by the launcher."""
    args = build_parser().parse_args(argv)
    try:
        report = inspect(args.checkpoint, args.patch, args.device, args.dtype, args.attention,
                         inject=inject)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {message}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2, sort_keys=True))
    return 0
