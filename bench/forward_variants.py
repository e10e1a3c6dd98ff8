"""Whole fp8 forwards of a 14B-shaped stack under switches, side by side in one run (GPU only);
prints one JSON object.

    python bench/forward_variants.py [--blocks 8] [--tokens 32760 8100] [--rounds 12] \
        [--variants sdpa sdpa@rows int8 int8@rows] [--out FILE]

A variant is a bench/common.attention_spec string: the attention backend and optionally a
switch ("@rows": quant_linear.DYNAMIC_ROWS, every dynamic fp8 input scaled per row;
"@tensorwise", "@cuda:...", ...). One model (bench/quant.py's: fp8_e4m3fn_scaled weights resident
on the GPU, InfiniteTalk layers present, no audio input) serves every variant, since the switches
are read at call time. The rounds alternate the variants, one forward each, so the GPU's clock
drift weighs on all alike; the first variant is the baseline and is timed twice ("<first>
again" is the noise floor). Per variant: the median forward, "speedup" the median over rounds
of baseline / variant in that round, "won" the share of rounds it was faster, and the output
against the baseline's (bit-equal, cosine).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from common import attention_spec, build, emit  # noqa: E402
from quant import inputs  # noqa: E402


def one_forward_ms(model, args_, spec: str) -> tuple[float, torch.Tensor]:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with attention_spec(spec) as backend, torch.no_grad():
        model.set_attention(backend)
        start.record()
        out = model(**args_)
        end.record()
        end.synchronize()
    return start.elapsed_time(end), out


def measure(model, tokens: int, variants: list, rounds: int) -> dict:
    args_ = inputs(tokens)
    names = variants + [variants[0] + " again"]
    spec = {name: name.removesuffix(" again") for name in names}
    outputs = {}
    for name in names:                          # warm-up, compilation, outputs
        for _ in range(2):
            _, outputs[name] = one_forward_ms(model, args_, spec[name])
    samples = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            samples[name].append(one_forward_ms(model, args_, spec[name])[0])
    base, ref = samples[variants[0]], outputs[variants[0]].float().flatten()
    result = {"tokens": tokens, "rounds": rounds, "baseline": variants[0],
              "baseline_ms": statistics.median(base), "variants": {}}
    for name in names[1:]:
        times, out = samples[name], outputs[name]
        result["variants"][name] = {
            "ms": statistics.median(times),
            "speedup": statistics.median(b / t for b, t in zip(base, times)),
            "won": sum(t < b for b, t in zip(base, times)) / rounds,
            "bit_equal": bool(torch.equal(out, outputs[variants[0]])),
            "cosine": torch.nn.functional.cosine_similarity(out.float().flatten(), ref, dim=0).item()}
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=8)
    p.add_argument("--tokens", type=int, nargs="+", default=[32760, 8100])
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--variants", nargs="+", default=["sdpa", "sdpa@rows"])
    p.add_argument("--quant", default="fp8_e4m3fn_scaled")
    p.add_argument("--out")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    for spec in args.variants:
        with attention_spec(spec):   # a typo fails before the model is built
            pass
    model = build(args.blocks, args.quant, storage="cuda")
    emit({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "blocks": args.blocks,
          "quant": args.quant,
          "sizes": [measure(model, n, args.variants, args.rounds) for n in args.tokens]},
         args.out)


if __name__ == "__main__":
    main()
