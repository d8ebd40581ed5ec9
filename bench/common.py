"""What every benchmark writes beside its numbers: command, versions, hardware, date."""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable


def environment() -> dict:
    import torch

    env = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,  # others' work skews timings
        "torch_threads": torch.get_num_threads(),
        "omp": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")},
    }
    for mod in ("diffusers", "transformers", "peft", "accelerate"):
        try:
            env[mod] = __import__(mod).__version__
        except ImportError:
            env[mod] = None
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        env["cuda"] = torch.version.cuda
        try:
            import pynvml

            pynvml.nvmlInit()
            env["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception as e:  # NVML missing is worth recording, not fatal
            env["driver"] = f"unknown ({type(e).__name__})"
    return env


def write_result(path: Path, payload: dict) -> Path:
    from leapalign_fast.io import write_json_atomic

    write_json_atomic(path, {"environment": environment(), **payload})
    return path


def slug(text: str | None) -> str:
    return "".join(c if c.isalnum() else "-" for c in (text or "cpu")).strip("-").lower()


def interleaved_times(
    variants: dict[str, Callable[[], object]], repeats: int, sync: Callable[[], None] = lambda: None, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each variant over `repeats` rounds; each round runs every variant once, in turn, so a change in
    the machine's load hits all variants alike. `warmup` untimed rounds first (compilation, allocator, caches)."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    sync()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, run in variants.items():
            t0 = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - t0)
    return times


def time_summary(samples: list[float]) -> dict:
    """Median with min, max and spread ((max - min) / median) of a list of seconds."""
    med = statistics.median(samples)
    return {
        "seconds_median": med,
        "seconds_min": min(samples),
        "seconds_max": max(samples),
        "spread": (max(samples) - min(samples)) / med if med else 0.0,
        "repeats": len(samples),
    }


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Ratio of two variants' times round by round (both ran in the same round): median and range."""
    r = [a / b for a, b in zip(numerator, denominator)]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def peak_rss_mib() -> float:
    """This process's peak resident memory (CPU runs report it where CUDA runs report the allocator peak)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append_row(path: Path | str | None, row: dict) -> None:
    """Append one result row to a JSONL file the moment it is measured (flushed and fsynced): a run stopped from
    outside keeps every row finished before it (bench/gpu_run.sh gathers them under $OUT). No-op without a path."""
    if path is None:
        return
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error of the device (a result to record, not a crash)."""
    import torch

    return isinstance(e, torch.cuda.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
