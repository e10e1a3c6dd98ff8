"""Memory of the wav2vec2 speech encoder on long audio: the one-piece path against the chunked one.

    python bench/wav2vec2_memory.py [--seconds 10 60 600] [--device cuda] [--one-shot-max 600]
        [--conv-frames N] [--rows N] [--score-elements N] [--block-attention] [--no-tf32] [--out FILE]

A chinese-wav2vec2-base-shaped encoder (Wav2Vec2Config() defaults: 7 conv layers of 512 channels,
12 transformer layers of 768, 12 heads) with random weights, built on the meta device and
materialised on --device; no download. For each length the features are computed the way the
pack did before chunking (whole clip at once, the 12 layer outputs stacked on the device) and the
way it does now (multitalk.audio_features.wav2vec_features with the default Chunking, or the
--conv-frames / --rows / --score-elements overrides). Prints one JSON object: per length and
path the peak CUDA memory above the weights, wall seconds, and the max abs difference between
the two paths. The one-piece path is skipped above --one-shot-max seconds, and a CUDA
out-of-memory there is reported, not raised. On --device cpu peaks are null (a smoke test).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from common import RandomWeights, emit  # noqa: E402  (also loads the pack as wanvideo_infinitetalk)

from wanvideo_infinitetalk.multitalk import audio_features as af  # noqa: E402
from wanvideo_infinitetalk.multitalk import wav2vec2 as w2v  # noqa: E402
from wanvideo_infinitetalk.wanvideo import placement  # noqa: E402


def build_encoder(device) -> w2v.Wav2Vec2Encoder:
    cfg = w2v.Wav2Vec2Config()
    with torch.device("meta"):
        model = w2v.Wav2Vec2Encoder(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    torch.manual_seed(0)
    placement.materialize(model, RandomWeights(shapes, device), torch.device(device),
                          where="random wav2vec2")
    return model.eval().requires_grad_(False)


def speech(seconds: float, seed: int = 0) -> np.ndarray:
    """Voiced-like test signal: a pitch with syllable-rate envelope plus noise, 16 kHz float32."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * af.SAMPLE_RATE)) / af.SAMPLE_RATE
    x = 0.1 * np.sin(2 * np.pi * 180 * t + 3 * np.sin(2 * np.pi * 0.7 * t))
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)
    return (x + 0.01 * rng.standard_normal(t.shape)).astype(np.float32)


@torch.no_grad()
def one_piece_features(encoder, x: np.ndarray, device) -> torch.Tensor:
    """The pack's feature path before chunking: every stage over the whole clip at once."""
    n = af.check_length(x.shape[0])
    wave = torch.from_numpy(af.normalize(x)).to(device=device, dtype=torch.float32)[None]
    feats = encoder.conv_features(wave, w2v.ONE_SHOT)
    feats = F.interpolate(feats.transpose(1, 2), size=n, mode="linear",
                          align_corners=True).transpose(1, 2)
    return encoder.layer_outputs(feats, w2v.ONE_SHOT)[0].float().cpu()


def measure(fn, cuda: bool) -> tuple[dict, torch.Tensor | None]:
    """Run fn once: wall seconds and peak allocated CUDA memory above what was live before."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    try:
        out = fn()
    except torch.cuda.OutOfMemoryError as exc:
        return {"error": f"CUDA out of memory: {str(exc).splitlines()[0]}"}, None
    if cuda:
        torch.cuda.synchronize()
    row = {"seconds": round(time.perf_counter() - t0, 3)}
    if cuda:
        row["peak_above_weights_gb"] = round((torch.cuda.max_memory_allocated() - before) / 1e9, 3)
    return row, out


def run_length(encoder, seconds: float, chunking: w2v.Chunking, args, cuda: bool) -> dict:
    x = speech(seconds)
    row = {"audio_seconds": seconds, "frames": af.check_length(x.shape[0])}
    row["chunked"], chunked = measure(lambda: af.wav2vec_features(encoder, x, args.device,
                                                                  chunking=chunking), cuda)
    if seconds > args.one_shot_max:
        row["one_piece"] = {"skipped": f"longer than --one-shot-max {args.one_shot_max} s"}
        return row
    row["one_piece"], whole = measure(lambda: one_piece_features(encoder, x, args.device), cuda)
    if whole is not None and chunked is not None:
        row["max_abs_diff"] = float((whole - chunked).abs().max())
        row["max_abs_value"] = float(whole.abs().max())
    return row


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, nargs="+", default=[10, 60, 600])
    p.add_argument("--device", default="cuda")
    p.add_argument("--one-shot-max", type=float, default=600,
                   help="skip the one-piece path for longer audio (seconds)")
    p.add_argument("--conv-frames", type=int, default=w2v.DEFAULT_CHUNKING.conv_frames)
    p.add_argument("--rows", type=int, default=w2v.DEFAULT_CHUNKING.rows)
    p.add_argument("--score-elements", type=int, default=w2v.DEFAULT_CHUNKING.score_elements)
    p.add_argument("--block-attention", action="store_true",
                   help="query blocks even where a fused SDPA kernel streams the keys (the bound "
                        "the math backend needs)")
    p.add_argument("--no-tf32", action="store_true",
                   help="fp32 convolutions in full precision (cuDNN uses TF32 by default), to see "
                        "the chunked and one-piece features agree to fp32 rounding")
    p.add_argument("--out")
    args = p.parse_args(argv)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
    cuda = torch.device(args.device).type == "cuda"
    chunking = w2v.Chunking(args.conv_frames, args.rows, args.score_elements,
                            trust_fused_attention=not args.block_attention)
    encoder = build_encoder(args.device)
    weights = sum(t.numel() * t.element_size() for t in encoder.parameters())
    for fn in (lambda: af.wav2vec_features(encoder, speech(2.0), args.device, chunking=chunking),
               lambda: one_piece_features(encoder, speech(2.0), args.device)):
        fn()  # warm-up: library handles and workspaces are not per-clip memory
    result = {
        "device": torch.cuda.get_device_name(args.device) if cuda else "cpu",
        "torch": torch.__version__, "weights_gb": round(weights / 1e9, 3),
        "cudnn_tf32": torch.backends.cudnn.allow_tf32, "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        "chunking": {"conv_frames": chunking.conv_frames, "rows": chunking.rows,
                     "score_elements": chunking.score_elements,
                     "trust_fused_attention": chunking.trust_fused_attention},
        "runs": [run_length(encoder, s, chunking, args, cuda) for s in args.seconds],
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
