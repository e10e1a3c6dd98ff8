"""`python -m wanvideo.inspect CHECKPOINT [--patch FILE] [--device cpu|cuda] [--dtype bf16|fp16|fp32]`

Loads a Wan2.1 checkpoint the way the nodes do and prints one JSON report. The implementation
lives in inspect_report.py; this file only makes a top-level `python -m` run find the pack.
"""
import sys

if __name__ == "__main__":
    from ._pack import import_in_pack

    sys.exit(import_in_pack("wanvideo.inspect_report").main())
