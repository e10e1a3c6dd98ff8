"""Turn the benchmark JSON in bench/results/ into the PNG plots docs/BENCHMARKS.md and the README
show. Needs matplotlib (not a dependency of the pack: `pip install matplotlib`).

    python scripts/plot_benchmarks.py [--results bench/results] [--out docs/img]
"""
from __future__ import annotations

import argparse
import glob
import json
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE_OF = {
    "WanVideoModelLoader": "load models", "CLIPLoader": "load models",
    "CLIPVisionLoader": "load models", "VAELoader": "load models",
    "InfiniteTalkModelLoader": "load models", "Wav2Vec2ModelLoader": "load models",
    "CLIPTextEncode": "text encode", "CLIPVisionEncode": "CLIP vision",
    "LoadAudio": "audio features", "InfiniteTalkAudioEmbeds": "audio features",
    "InfiniteTalkImageToVideo": "VAE encode (image)", "CreateVideo": "save MP4",
    "SaveVideo": "save MP4",
}
ORDER = ["load models", "text encode", "CLIP vision", "audio features", "VAE encode (image)",
         "sampling", "VAE decode", "VAE encode (motion)", "save MP4", "other"]


def stage_seconds(run: dict) -> dict[str, float]:
    """Seconds per stage of one e2e run; the sampler node is split by its own window log."""
    out = dict.fromkeys(ORDER, 0.0)
    decode = sum(w["decode_s"] for w in run.get("windows", []))
    encode = sum(w["encode_s"] for w in run.get("windows", []))
    for s in run["stages"]:
        if s["class"] == "WanVideoInfiniteTalkSampler":
            out["sampling"] += s["wall_s"] - decode - encode
            out["VAE decode"] += decode
            out["VAE encode (motion)"] += encode
        else:
            out[STAGE_OF.get(s["class"], "other")] += s["wall_s"]
    return out


def e2e_cards(results: str) -> list[dict]:
    cards = []
    for path in sorted(glob.glob(os.path.join(results, "e2e_*.json"))):
        with open(path) as f:
            report = json.load(f)
        cards += [dict(c, gpu=report.get("gpu", "?")) for c in report["cards"]]
    return sorted(cards, key=lambda c: c["card_gib"])


def plot_stages(plt, cards: list[dict], out: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 4.5))
    labels, bottoms = [], []
    rows = [(f"{c['card_gib']:g} GB\n{run}", stage_seconds(c["runs"][run]))
            for c in cards for run in ("cold", "warm") if c["runs"].get(run, {}).get("ok")]
    bottoms = [0.0] * len(rows)
    for stage in ORDER:
        values = [r[1][stage] for r in rows]
        if not any(v > 0.05 for v in values):
            continue
        ax.bar(range(len(rows)), values, bottom=bottoms, label=stage)
        bottoms = [b + v for b, v in zip(bottoms, values)]
    labels = [r[0] for r in rows]
    for i, total in enumerate(bottoms):
        ax.text(i, total + 1, f"{total:.0f} s", ha="center", fontsize=8)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("seconds from queue to MP4")
    ax.set_title(f"10 s of 832x480 video, 14B fp8 + LoRA, 4 steps (rehearsed cards on "
                 f"{cards[0]['gpu']})", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, out, "e2e_stages.png")


def plot_vram(plt, cards: list[dict], out: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 4))
    for c in cards:
        t = [p[0] for p in c.get("trace", [])]
        ax.plot(t, [p[1] for p in c.get("trace", [])], label=f"{c['card_gib']:g} GB card",
                linewidth=1)
        if c["card_gib"]:
            ax.axhline(c["card_gib"] * 2 ** 30 / 1e9, linestyle=":", linewidth=0.8,
                       color=ax.lines[-1].get_color())
    ax.set_xlabel("seconds since the server started the first prompt (cold, warm, ...)")
    ax.set_ylabel("card memory used, GB (NVML)")
    ax.set_title("Card memory through cold and warm runs; dotted: the card's size", fontsize=9)
    ax.legend(fontsize=8)
    return _save(fig, out, "e2e_vram.png")


def plot_blockswap(plt, results: str, out: str) -> str:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for path in sorted(glob.glob(os.path.join(results, "blockswap_*.json"))):
        with open(path) as f:
            report = json.load(f)
        points = sorted((case["tokens"], case["ours_depth1"]["ratio_to_resident"])
                        for case in report["cases"].values() if "ours_depth1" in case)
        ax.plot([p[0] for p in points], [(p[1] - 1) * 100 for p in points], marker="o",
                label=f"{report.get('device', '?')} ({os.path.basename(path)})")
    ax.set_xlabel("tokens per forward (8,100 = 480x832x33, 32,760 = x81)")
    ax.set_ylabel("BlockSwap overhead, % of resident")
    ax.set_title("All 40 blocks streamed, bf16 14B-shaped model", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, out, "blockswap_tokens.png")


def _save(fig, out: str, name: str) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", default=os.path.join(ROOT, "bench", "results"))
    p.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    a = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(a.out, exist_ok=True)
    cards = e2e_cards(a.results)
    written = [plot_blockswap(plt, a.results, a.out)]
    if cards:
        written += [plot_stages(plt, cards, a.out), plot_vram(plt, cards, a.out)]
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
