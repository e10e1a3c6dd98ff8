"""`python -m wanvideo.make_tiny OUTDIR`: write the tiny models (tiny_models.py, plus the
InfiniteTalk patches and wav2vec2 folder of multitalk/tiny.py) into
OUTDIR/<ComfyUI model folder>/... and print what was written as JSON. Being a front end, it may
reach multitalk/; the library under wanvideo/ does not."""
import json
import sys

if __name__ == "__main__":
    from ._pack import import_in_pack

    if len(sys.argv) != 2:
        print("usage: python -m wanvideo.make_tiny OUTDIR", file=sys.stderr)
        sys.exit(2)
    written = import_in_pack("multitalk.tiny").write_all_tiny_models(sys.argv[1])
    print(json.dumps(written, indent=1, sort_keys=True))
