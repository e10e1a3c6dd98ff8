"""The CUDA 8-bit attention kernel's candidate options against its default, side by side in one
run, GPU only (Hopper); prints one JSON object.

    python bench/attention_variants.py [--tokens 32760 8100] [--rounds 30] \
        [--variants "pingpong=0" "preset_lds=1,pingpong=0" "v_direct=1" ...] [--out FILE]

A variant is a comma list of key=0|1 (bench/common.cuda_switches: attention_int8_cuda_source's
options, and v_direct). Every function is the whole call as the model makes it (K/V pass and
kernel: attention_int8.attention_int8 with cuda=True, so a failing variant raises instead of
handing over to another kernel) on bench/attention.py's DiT-like inputs. The rounds alternate
all functions, one sample (5 back-to-back calls between CUDA events) each, so the GPU's drift
weighs on all alike; "default_again" is the default once more, the noise floor. `--cold`:
each sample is one call after 1 GB of writes that evict the 50 MB L2 (as when the inputs were
written long before; the writes also keep the GPU busy while the call is enqueued). Per variant:
the median time, "speedup" the median over rounds of default / variant in that round, "won"
the share of rounds it was faster, and whether its output equals the default's bit for bit.
"""
from __future__ import annotations

import argparse
import statistics

import torch

from attention import dit_inputs, round_samples  # noqa: E402
from common import cuda_switches, emit, with_cuda_switches  # noqa: E402

from wanvideo_infinitetalk.wanvideo import attention_int8 as ai  # noqa: E402


def _call(q, k, v, text: str):
    return with_cuda_switches(lambda: ai.attention_int8(q, k, v, cuda=True), text)


def cold_ms(fn, flush: torch.Tensor) -> float:
    """One call of fn with nothing of its inputs in L2."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    flush.zero_()
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def measure(tokens: int, variants: list, rounds: int, heads: int, cold: bool = False) -> dict:
    q, k, v = dit_inputs(tokens, heads, 128, seed=tokens)
    fns = {"default": _call(q, k, v, ""), **{text: _call(q, k, v, text) for text in variants},
           "default_again": _call(q, k, v, "")}
    reference = fns["default"]()
    equal = {name: bool(torch.equal(fn(), reference)) for name, fn in fns.items()}
    flush = torch.empty(1 << 30, dtype=torch.uint8, device="cuda") if cold else None
    samples = round_samples(fns, rounds, (lambda fn: cold_ms(fn, flush)) if cold else None)
    base = samples["default"]
    return {"tokens": tokens, "rounds": rounds, "cold": cold, "default_ms": statistics.median(base),
            "variants": {name: {"ms": statistics.median(times),
                                "speedup": statistics.median(b / t for b, t in zip(base, times)),
                                "won": sum(t < b for b, t in zip(base, times)) / rounds,
                                "bit_equal": equal[name]}
                         for name, times in samples.items() if name != "default"}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[32760, 8100])
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--variants", nargs="+", default=["pingpong=0", "preset_lds=1",
                                                      "preset_lds=1,pingpong=0", "v_direct=1"])
    p.add_argument("--cold", action="store_true", help="each sample one call with L2 evicted")
    p.add_argument("--out")
    args = p.parse_args()
    for text in args.variants:
        cuda_switches(text)   # a typo fails before any GPU work
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        raise SystemExit("needs a Hopper GPU (the CUDA kernel is sm_90a)")
    emit({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
          "sizes": [measure(n, args.variants, args.rounds, args.heads, args.cold)
                    for n in args.tokens]},
         args.out)


if __name__ == "__main__":
    main()
