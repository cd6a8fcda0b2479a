"""Shared helpers for the benchmarks: machine info, interleaved timing, CPU peak memory, output."""

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch


def machine_info() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).parent).stdout.strip()
        commit += "+dirty" if dirty else ""
    except OSError:
        commit = "unknown"
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "commit": commit, "python": platform.python_version()}
    try:
        info["loadavg_at_start"] = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def interleaved_times(fns: dict, repeats: int, warmup: int = 1, sync=None) -> dict:
    """Seconds of every call of each fn, run round-robin so that machine noise hits all alike.

    Each round starts one fn later than the one before, so that no fn always runs right after the
    same neighbour (a call that frees gigabytes, as an every-layer MoE's gradients, can change what
    the next one pays for its memory).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    names = list(fns)
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            fn = fns[name]
            if sync:
                sync()
            start = time.perf_counter()
            fn()
            if sync:
                sync()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1, sync=None) -> dict:
    """Median seconds per call of each fn, from `interleaved_times`."""
    return {name: statistics.median(v) for name, v in interleaved_times(fns, repeats, warmup, sync).items()}


def paired_ratios(times: dict, num: str, den: str) -> dict:
    """`num` / `den` time ratios round by round from `interleaved_times` (the two calls of a round
    ran next to each other, so slow phases of the machine hit both): median, range, and in how
    many rounds `num` was the faster."""
    ratios = [a / b for a, b in zip(times[num], times[den])]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": len(ratios),
            "rounds_faster": sum(r < 1 for r in ratios)}


def cpu_peak_bytes(fn) -> int | None:
    """Peak bytes held by tensors allocated during fn (CPU), from the profiler's memory accounting:
    each op's own allocations minus frees (`self_cpu_memory_usage`; a net allocation placed at the
    op's start, a net free at its end, so the peak is not underestimated) and the frees recorded
    outside any op (`[memory]` events), summed in time order. Tensors alive before fn are not counted."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        deltas = []
        for e in prof.events():
            delta = e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage
            if delta:  # an op's net allocation counts from its start, its net free from its end
                deltas.append((e.time_range.start if delta > 0 else e.time_range.end, delta))
        level = peak = 0
        for _, delta in sorted(deltas, key=lambda d: d[0]):
            level += delta
            peak = max(peak, level)
        return peak
    except Exception:  # profiler internals vary across versions; memory is then reported as unknown
        return None


def print_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    widths = {c: max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in columns}
    lines = [" | ".join(c.ljust(widths[c]) for c in columns), "-|-".join("-" * widths[c] for c in columns)]
    lines += [" | ".join(fmt(r.get(c, "")).ljust(widths[c]) for c in columns) for r in rows]
    text = "\n".join(lines)
    print(text)
    return text


def write_json(path, payload) -> None:
    if path:
        Path(path).write_text(json.dumps(payload, indent=2))
        print(f"wrote {path}")
