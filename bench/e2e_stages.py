"""Measurements for bench/e2e.py: a sampler thread reading the card's used memory (NVML, what a
real card would show: CUDA context and caches included) and the server's RSS every 50 ms, and the
per-stage and per-window figures cut out of those samples by ComfyUI's websocket messages."""
from __future__ import annotations

import re
import threading
import time

GB = 1e9
WINDOW_LINE = re.compile(r"InfiniteTalk window (\d+)/(\d+): .*?sample ([\d.]+) s, decode ([\d.]+) s, "
                         r"encode ([\d.]+) s")
SWAP_LINE = re.compile(r"swapping (\d+) of (\d+) blocks")


class Monitor:
    """Samples (t, device bytes used, server RSS bytes) until stopped. Device figures come from
    NVML so this process never opens a CUDA context of its own (it would count as used)."""

    def __init__(self, pid: int, gpu_index: int | None, period: float = 0.05):
        self.pid, self.period, self.samples = pid, period, []
        self._stop = threading.Event()
        self._nvml = _nvml_handle(gpu_index) if gpu_index is not None else None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Monitor":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process(self.pid)
        while not self._stop.is_set():
            try:
                rss = proc.memory_info().rss
            except psutil.Error:
                return
            self.samples.append((time.monotonic(), self.device_used(), rss))
            self._stop.wait(self.period)

    def device_used(self) -> int:
        if self._nvml is None:
            return 0
        import pynvml

        return int(pynvml.nvmlDeviceGetMemoryInfo(self._nvml).used)

    def window(self, start: float, end: float) -> dict:
        """Peaks and end values of the samples in [start, end] (the nearest one if none)."""
        inside = [s for s in self.samples if start <= s[0] <= end] or \
            [min(self.samples, key=lambda s: abs(s[0] - end))]
        return {"peak_vram_gb": max(s[1] for s in inside) / GB,
                "peak_rss_gb": max(s[2] for s in inside) / GB,
                "rss_start_gb": inside[0][2] / GB, "rss_end_gb": inside[-1][2] / GB}

    def trace(self, start: float, step: float = 0.5) -> list[list[float]]:
        """[seconds since start, VRAM GB, RSS GB] thinned to one sample per `step` seconds."""
        out, next_t = [], start
        for t, vram, rss in self.samples:
            if t >= next_t:
                out.append([round(t - start, 2), round(vram / GB, 3), round(rss / GB, 3)])
                next_t = t + step
        return out


def _nvml_handle(index: int):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as e:  # noqa: BLE001  (no NVML: device figures read 0 and say so)
        print(f"[e2e] NVML unavailable ({e}); device memory not sampled", flush=True)
        return None


def node_stages(entry: dict, prompt: dict, queued_at: float, monitor: Monitor) -> list[dict]:
    """One record per executed node, in order: class, wall seconds (from its `executing` message
    to the next one), and the memory peaks inside that span. Cached nodes are not listed."""
    events = entry["events"]
    marks = [(m["received"], (m.get("data") or {}).get("node")) for m in events
             if m.get("type") == "executing"]
    end = max((m["received"] for m in events), default=time.monotonic())
    stages = []
    for i, (t, node) in enumerate(marks):
        if node is None:
            continue
        t_next = marks[i + 1][0] if i + 1 < len(marks) else end
        stages.append({"node": node, "class": prompt[node]["class_type"],
                       "start_s": round(t - queued_at, 2), "wall_s": round(t_next - t, 2),
                       **{k: round(v, 3) for k, v in monitor.window(t, t_next).items()}})
    return stages


def step_times(entry: dict, node: str) -> list[float]:
    """Seconds between the sampler's successive progress messages (one per step)."""
    ts = [m["received"] for m in entry["events"] if m.get("type") == "progress"
          and (m.get("data") or {}).get("node") == node]
    return [round(b - a, 3) for a, b in zip(ts, ts[1:])]


def window_ends(entry: dict, node: str, steps: int) -> tuple[list[float], int | None]:
    """(receive times of the progress messages that end each window's sampling, windows planned).
    The sampler reports one ProgressBar over all windows (nodes/sampler.py comfy_callbacks):
    value = finished steps of the whole video, max = steps x windows, so window k's sampling ends
    at value == k x steps. Only the unbroken run of windows 1, 2, ... is returned."""
    ends, planned = {}, None
    for m in entry["events"]:
        d = m.get("data") or {}
        if m.get("type") != "progress" or d.get("node") != node:
            continue
        value, total = int(d.get("value", 0)), int(d.get("max", 0))
        if steps > 0 and total % steps == 0:
            planned = total // steps
        if steps > 0 and value > 0 and value % steps == 0:
            ends.setdefault(value // steps, m["received"])
    out = []
    while len(out) + 1 in ends:
        out.append(ends[len(out) + 1])
    return out, planned


def node_start(entry: dict, node: str) -> float | None:
    """When the `executing` message of `node` arrived (None: it did not execute)."""
    return next((m["received"] for m in entry["events"] if m.get("type") == "executing"
                 and (m.get("data") or {}).get("node") == node), None)


def window_rss(entry: dict, node: str, steps: int, monitor: Monitor, queued_at: float,
               target_gb: float = 1.0) -> dict:
    """Server RSS per sampler window: window k spans from the end of window k-1's sampling (the
    sampler's start for k = 1) to the end of its own sampling, so it holds window k-1's decode,
    colour match, motion encode and MP4 write plus window k's sampling. Per window: RSS at the
    end of its sampling and the peak inside it; growth from window 2 to the last of both."""
    ends, planned = window_ends(entry, node, steps)
    start = node_start(entry, node)
    if start is None or not ends or not monitor.samples:
        return {"rss_per_window_gb": [], "windows_planned": planned}
    rows, prev = [], start
    for k, t in enumerate(ends, 1):
        w = monitor.window(prev, t)
        rows.append({"window": k, "sampled_at_s": round(t - queued_at, 2),
                     "end": round(w["rss_end_gb"], 3), "peak": round(w["peak_rss_gb"], 3)})
        prev = t
    out = {"rss_per_window_gb": rows, "windows_planned": planned}
    if len(rows) >= 2:
        growth = rows[-1]["end"] - rows[1]["end"]
        peak_growth = max(r["peak"] for r in rows[1:]) - rows[1]["peak"]
        out.update(rss_growth_window2_to_last_gb=round(growth, 3),
                   rss_peak_growth_window2_to_last_gb=round(peak_growth, 3),
                   rss_flat_target={"max_growth_gb": target_gb,
                                    "met": growth <= target_gb and peak_growth <= target_gb})
    return out


def window_lines(log_text: str) -> list[dict]:
    return [{"window": int(m[1]), "of": int(m[2]), "sample_s": float(m[3]),
             "decode_s": float(m[4]), "encode_s": float(m[5])}
            for m in WINDOW_LINE.finditer(log_text)]


def blocks_swapped(log_text: str) -> list[int]:
    return [int(m[1]) for m in SWAP_LINE.finditer(log_text)]
