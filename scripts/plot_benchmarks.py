"""Turn the benchmark JSON in bench/results/ into the PNG plots docs/BENCHMARKS.md and the README
show. Needs matplotlib (not a dependency of the pack: `pip install matplotlib`).

    python scripts/plot_benchmarks.py [--results bench/results] [--out docs/img]

Writes blockswap_tokens.png (every blockswap_*.json), e2e_stages.png and e2e_vram.png (e2e_*.json),
e2e_long_rss.png (the one-minute "long" run of e2e_*.json) and multigpu_speedup.png
(multigpu_*.json); a plot whose input is missing is left out.

Which file, when several measure the same thing (the newest measurement wins):
- e2e: each card (card_gib) is drawn from exactly one report, so no card is drawn twice. Among the
  e2e_*.json that hold the card with at least one ok run, the newest wins: a report written by
  the current bench (it records `plan`) beats one from the older bench (no `plan`); between
  reports of the same bench, the later file modification time, then the later file name. A
  report with several cards (e2e_h200_card24_16.json) can lose one card (16 GB to
  e2e_h200_card16_rerun.json) and keep another (24 GB). The stage plot shows the chosen report's
  cold and warm runs (a report that ran cold,long has no warm bar); the trace is the whole plan.
- e2e_long_rss.png: the same rule among the reports with an ok "long" run that recorded
  `rss_per_window_gb`; the smallest card with one is drawn.
- multigpu: the same rule among multigpu_*.json, where "current bench" means its cases record
  `by_sp` (or the older `by_pieces`) and whose headline variant (`sp`) is not the opt-in key
  exchange; the 2-GPU time is the headline variant's.
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


def _reports(results: str, pattern: str) -> list[tuple[str, dict]]:
    out = []
    for path in sorted(glob.glob(os.path.join(results, pattern))):
        with open(path) as f:
            out.append((path, json.load(f)))
    return out


def _newness(path: str, current_bench: bool) -> tuple:
    """Sort key, larger = newer: the current bench's reports first, then mtime, then name."""
    return (current_bench, os.path.getmtime(path), os.path.basename(path))


def _ok_runs(card: dict) -> list[str]:
    return [name for name, run in card.get("runs", {}).items() if run.get("ok")]


def e2e_cards(results: str, want=_ok_runs) -> list[dict]:
    """One entry per card: the card from the newest e2e report that holds it and passes want
    (default: has an ok run); see the module docstring. Each entry gains gpu and source."""
    best: dict[float, tuple] = {}
    for path, report in _reports(results, "e2e_*.json"):
        rank = _newness(path, "plan" in report)
        for card in report.get("cards", []):
            if not want(card):
                continue
            key = float(card["card_gib"])
            if key not in best or rank > best[key][0]:
                best[key] = (rank, dict(card, gpu=report.get("gpu", "?"),
                                        source=os.path.basename(path)))
    return [best[k][1] for k in sorted(best)]


def _has_long(card: dict) -> bool:
    run = card.get("runs", {}).get("long", {})
    return bool(run.get("ok") and run.get("rss_per_window_gb"))


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
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    _sources(fig, cards)
    return _save(fig, out, "e2e_stages.png")


def _sources(fig, cards: list[dict]) -> None:
    fig.text(0.005, 0.005, "from " + ", ".join(f"{c['source']} ({c['card_gib']:g} GB)"
                                               for c in cards), fontsize=6, color="grey")


def plot_vram(plt, cards: list[dict], out: str) -> str:
    fig, ax = plt.subplots(figsize=(9, 4))
    for c in cards:
        t = [p[0] for p in c.get("trace", [])]
        runs = ", ".join(_run_label(c, name) for name in c.get("runs", {}))
        ax.plot(t, [p[1] for p in c.get("trace", [])], linewidth=1,
                label=f"{c['card_gib']:g} GB card: {runs}")
        if c["card_gib"]:
            ax.axhline(c["card_gib"] * 2 ** 30 / 1e9, linestyle=":", linewidth=0.8,
                       color=ax.lines[-1].get_color())
    ax.set_xlabel("seconds since the server started the first prompt (cold, warm, ...)")
    ax.set_ylabel("card memory used, GB (NVML)")
    ax.set_title("Card memory through each card's runs (cold, warm, ...); dotted: the card's size",
                 fontsize=9)
    ax.legend(fontsize=8)
    _sources(fig, cards)
    return _save(fig, out, "e2e_vram.png")


def _run_label(card: dict, name: str) -> str:
    video = card["runs"][name].get("video") or {}
    return f"{name} {video['audio_s']:.0f} s" if name == "long" and video.get("audio_s") else name


def plot_long_rss(plt, card: dict, out: str) -> str:
    """Server RSS per window of the long run (end of window, peak inside it, the flat-RAM bounds
    window 2 + 1 GB) and RSS over the whole plan from the trace."""
    run = card["runs"]["long"]
    rows = run["rss_per_window_gb"]
    limit = run.get("rss_flat_target", {}).get("max_growth_gb", 1.0)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [3, 2]})
    win = [r["window"] for r in rows]
    end, peak = [r["end"] for r in rows], [r["peak"] for r in rows]
    ax.plot(win, peak, marker="^", markersize=4, color="tab:orange", label="peak inside the window")
    ax.plot(win, end, marker="o", markersize=4, color="tab:blue", label="at the end of the window")
    if len(rows) >= 2:
        ax.axhline(end[1] + limit, color="tab:blue", linestyle="--", linewidth=1,
                   label=f"bound: window 2 end + {limit:g} GB = {end[1] + limit:.2f} GB")
        ax.axhline(peak[1] + limit, color="tab:orange", linestyle=":", linewidth=1,
                   label=f"bound: window 2 peak + {limit:g} GB = {peak[1] + limit:.2f} GB")
    lo, hi = min(end + peak), max(end + peak) + limit
    ax.set_ylim(lo - 2, hi + 1)
    ax.set_xticks(win)
    ax.tick_params(axis="x", labelsize=7)
    frames = (run.get("video") or {}).get("frames") or 0
    real_clip = frames and 1 + -(-(frames - 81) // 72) == len(rows)  # 81-frame windows, 9 kept
    ax.set_xlabel("window number" + (" (81 frames each, 9 carried over)" if real_clip else ""))
    ax.set_ylabel("server RSS, GB")
    video = run.get("streamed_video") or run.get("video") or {}
    growth = run.get("rss_growth_window2_to_last_gb")
    ax.set_title(f"{video.get('audio_s', 0):.0f} s of speech, {len(rows)} windows"
                 + (", stream_to_mp4" if run.get("stream_to_mp4") else "")
                 + (f": growth window 2 -> {len(rows)}: {growth:g} GB" if growth is not None
                    else ""), fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    trace = card.get("trace", [])
    if trace:
        t = [p[0] for p in trace]
        ax2.plot(t, [p[2] for p in trace], color="tab:blue", linewidth=1, label="server RSS")
        ax2.plot(t, [p[1] for p in trace], color="tab:green", linewidth=1,
                 label="card memory (NVML)")
        plan = list(card.get("runs", {}))
        if plan and plan[-1] == "long":  # the trace stops when the long run is done
            start = t[-1] - run["queue_to_done_s"]
            ax2.axvspan(start, t[-1], color="grey", alpha=0.12,
                        label=f"the {video.get('audio_s', 0):.0f} s run (start approx.)")
        ax2.set_ylim(0, max(p[2] for p in trace) * 1.15)
        ax2.set_xlabel("seconds since the first prompt (cold, then the long run)")
        ax2.set_ylabel("GB")
        ax2.set_title("RSS over time, full scale", fontsize=9)
        ax2.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Host memory stays flat however long the video is: {card['card_gib']:g} GB card"
                 f" rehearsed on {card['gpu']}, 832x480, 14B fp8 + LoRA", fontsize=10)
    _sources(fig, [card])
    return _save(fig, out, "e2e_long_rss.png")


CASE_ORDER = ["blockswap_all", "resident"]


def multigpu_report(results: str) -> tuple[str, dict] | None:
    """The newest multigpu_*.json (see the module docstring)."""
    best = None
    for path, report in _reports(results, "multigpu_*.json"):
        cases = report.get("cases", {})
        if not cases:
            continue
        current = any("by_sp" in c or "by_pieces" in c for c in cases.values())
        # a run headlined by an opt-in variant (the key exchange) does not show the default
        default = not any(str(c.get("sp", "")).startswith("keys") for c in cases.values())
        rank = _newness(path, current and default)
        if best is None or rank > best[0]:
            best = (rank, path, report)
    return best and (best[1], best[2])


def _two_gpu(case: dict) -> tuple[float, float, str | None]:
    """(2-GPU step s, speed-up, sequence-parallel variant) of the case's headline variant
    (`sp` / `by_sp`; results before the key exchange: `sp_pieces` / `by_pieces`)."""
    if "by_sp" in case:
        variant, table = case.get("sp"), case["by_sp"]
    else:
        variant, table = case.get("sp_pieces"), case.get("by_pieces", {})
        variant = None if variant is None else f"heads:{variant}"
    at = table.get(str(variant)) or table.get(str(variant).replace("heads:", ""))
    if at:
        return at["two_gpu_step_s"], at["speedup"], variant
    return case["two_gpu_step_s"], case["speedup"], variant


def plot_multigpu(plt, path: str, report: dict, out: str) -> str:
    cases, targets = report["cases"], report.get("targets", {})
    passes = sorted({name.split("/")[1] for name in cases}, key=lambda p: int(p[0]))
    fig, axes = plt.subplots(1, len(passes), figsize=(4.6 * len(passes), 4), squeeze=False)
    pieces_seen = set()
    for ax, npass in zip(axes[0], passes):
        target = targets.get("one_pass_speedup" if npass.startswith("1") else
                             "three_pass_speedup")
        names = sorted((n for n in cases if n.endswith("/" + npass)),
                       key=lambda n: (CASE_ORDER + [n.split("/")[0]]).index(n.split("/")[0]))
        for i, name in enumerate(names):
            case = cases[name]
            one = case["one_gpu_step_s"]
            two, speedup, pieces = _two_gpu(case)
            pieces_seen.add(pieces)
            ax.bar(i - 0.2, one, width=0.38, color="tab:grey", label="1 GPU" if i == 0 else None)
            ax.bar(i + 0.2, two, width=0.38, color="tab:blue", label="2 GPUs" if i == 0 else None)
            ax.text(i - 0.2, one, f"{one:.2f} s", ha="center", va="bottom", fontsize=7)
            ax.text(i + 0.2, two, f"{two:.2f} s\n{speedup:.3f}x", ha="center", va="bottom",
                    fontsize=8, fontweight="bold")
            if target:
                ax.hlines(one / target, i + 0.0, i + 0.4, colors="tab:red", linestyles="--",
                          linewidth=1.2,
                          label=f"2-GPU time at the {target:g}x target" if i == 0 else None)
        ax.set_xticks(range(len(names)),
                      [n.split("/")[0].replace("blockswap_all", "BlockSwap: all 40 blocks")
                       .replace("resident", "resident (no swap)") for n in names], fontsize=8)
        ax.set_ylim(0, max(cases[n]["one_gpu_step_s"] for n in names) * 1.4)
        ax.set_ylabel("seconds per denoising step")
        ax.set_title(f"{npass.replace('pass', '')} pass{'es' if not npass.startswith('1') else ''}"
                     f" per step (target {target:g}x)" if target else npass, fontsize=9)
        ax.legend(fontsize=7, loc="upper center", ncol=2)
    pieces = ", ".join(str(p) for p in sorted(pieces_seen, key=str))
    fig.suptitle(f"1 vs {len(report.get('devices', [])) or 2} x {report.get('gpu', '?')}: "
                 f"{report.get('model', '')}, {report.get('window', '')} "
                 f"({report.get('tokens', 0):,} tokens), attention exchange {pieces}",
                 fontsize=9)
    fig.text(0.005, 0.005, "from " + os.path.basename(path), fontsize=6, color="grey")
    return _save(fig, out, "multigpu_speedup.png")


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
    fig.tight_layout(rect=(0, 0.025, 1, 1))  # room for the "from <file>" line at the bottom
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
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
    long_cards = e2e_cards(a.results, want=_has_long)
    if long_cards:
        written.append(plot_long_rss(plt, long_cards[0], a.out))
    mgpu = multigpu_report(a.results)
    if mgpu:
        written.append(plot_multigpu(plt, *mgpu, a.out))
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
