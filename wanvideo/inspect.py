"""`python -m wanvideo.inspect CHECKPOINT [--patch FILE] [--device cpu|cuda] [--dtype bf16|fp16|fp32]`

Loads a Wan2.1 checkpoint the way the nodes do and prints one JSON report. The implementation
lives in inspect_report.py; this file only makes a top-level `python -m` run find the pack and,
as the front end, hands the loader InfiniteTalk's injector from multitalk/ (the library under
wanvideo/ never imports multitalk/ itself).
"""
import sys

if __name__ == "__main__":
    from ._pack import import_in_pack

    inject = import_in_pack("multitalk.inject").apply_infinitetalk_from_checkpoints
    sys.exit(import_in_pack("wanvideo.inspect_report").main(inject=inject))
