"""`python -m wanvideo.make_full_size OUTDIR [--only NAME ...] [--seed N]`: stream full-size
random-weight stand-ins of the public files the InfiniteTalk workflow reads (multitalk/stand_ins.py,
wanvideo/stand_ins.py) into OUTDIR/<ComfyUI model folder>/..., then print what was written as JSON.
About 60 GB for the whole set; for machines that cannot download the real weights. Being a front
end, it may reach multitalk/; the library under wanvideo/ does not."""
import argparse
import json
import sys

if __name__ == "__main__":
    from ._pack import import_in_pack

    stand_ins = import_in_pack("multitalk.stand_ins")
    parser = argparse.ArgumentParser(prog="python -m wanvideo.make_full_size")
    parser.add_argument("outdir")
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=stand_ins.all_names(),
                        help="write only these (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None,
                        help="draw the random values there, e.g. cuda (much faster; other values)")
    args = parser.parse_args()
    written = stand_ins.write_full_size_stand_ins(
        args.outdir, args.only, args.seed, log=lambda line: print(line, file=sys.stderr, flush=True),
        device=args.device)
    print(json.dumps(written, indent=1, sort_keys=True))
