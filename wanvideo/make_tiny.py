"""`python -m wanvideo.make_tiny OUTDIR`: write the tiny models (see tiny_models.py) into
OUTDIR/<ComfyUI model folder>/... and print what was written as JSON."""
import json
import sys

if __name__ == "__main__":
    from ._pack import import_in_pack

    if len(sys.argv) != 2:
        print("usage: python -m wanvideo.make_tiny OUTDIR", file=sys.stderr)
        sys.exit(2)
    written = import_in_pack("wanvideo.tiny_models").write_tiny_models(sys.argv[1])
    print(json.dumps(written, indent=1, sort_keys=True))
