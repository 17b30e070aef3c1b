"""What the benchmark scripts record about the machine they ran on, and how they time GPU work."""

from __future__ import annotations

import platform
import statistics
from pathlib import Path

import torch


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cuda_event_ms(fn, reps: int, warmup: int = 0) -> float:
    """Median ms of `fn` over `reps` calls (after `warmup` untimed ones), each between two CUDA
    events on the current stream and waited for before the next."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
