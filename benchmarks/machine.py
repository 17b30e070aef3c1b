"""What the benchmark scripts record about the machine they ran on, and how they time GPU work."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def autotuned_configs(*modules) -> dict[str, dict[str, str]]:
    """The configs Triton's autotuner picked so far in this process, per autotuned kernel of
    `modules` and per autotune key: a run's kernel times depend on them, and the pick can
    differ between processes (no disk cache on a fresh machine)."""
    from triton.runtime.autotuner import Autotuner
    return {f"{m.__name__.rsplit('.', 1)[-1]}.{name}":
            {str(k): str(c) for k, c in obj.cache.items()}
            for m in modules for name, obj in vars(m).items()
            if isinstance(obj, Autotuner) and obj.cache}


def cpu_name() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cuda_kernel_events(fn) -> list:
    """The GPU kernels of one call of `fn` in start order, from the profiler's records (CUPTI
    sees the kernels inside a replayed CUDA graph too); copies and empty records left out."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA
                   and e.time_range.elapsed_us() > 0 and "Memcpy" not in e.name),
                  key=lambda e: e.time_range.start)


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


def kernel_bench_device(smoke: bool) -> torch.device:
    """The GPU for a kernel benchmark, or the CPU (Triton's interpreter) for its --smoke check;
    a one-line exit where the benchmark needs a GPU and there is none."""
    if smoke or not torch.cuda.is_available():
        if not smoke:
            raise SystemExit("moeflow: error: no CUDA device; run with --smoke for the CPU check")
        return torch.device("cpu")
    return torch.device("cuda")


def kernel_bench_meta(device: torch.device, dtype: torch.dtype, shapes: list[dict], reps: int,
                      copy_ceiling_gbps: float | None, seconds: float) -> dict:
    """What a kernel benchmark records about its run: device, UTC time, versions, command."""
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "command": " ".join(["python"] + sys.argv), "dtype": str(dtype), "shapes": shapes,
            "reps": reps, "copy_ceiling_gbps": copy_ceiling_gbps, "seconds": seconds}


def measure_shapes(smoke: bool, shapes, smoke_shapes, measure, reps: int,
                   ceiling=None) -> tuple[list, dict]:
    """(rows, meta) of a kernel benchmark whose `measure(shape, dtype, device)` returns a row or
    a list of rows per shape: bf16 on the GPU, or with `smoke` fp32 on the CPU (Triton's
    interpreter has no bf16 dot); no autograd; the GPU's cache emptied after each shape (its
    weights). `ceiling(device)`: the copy rate the benchmark compares with, kept in meta."""
    t_start = time.perf_counter()
    device = kernel_bench_device(smoke)
    shapes, dtype = (smoke_shapes, torch.float32) if smoke else (shapes, torch.bfloat16)
    ceiling_gbps = ceiling(device) if ceiling is not None else None
    rows = []
    with torch.no_grad():
        for sh in shapes:
            got = measure(sh, dtype, device)
            rows += got if isinstance(got, list) else [got]
            if device.type == "cuda":
                torch.cuda.empty_cache()
    meta = kernel_bench_meta(device, dtype, [dataclasses.asdict(s) for s in shapes], reps,
                             ceiling_gbps, time.perf_counter() - t_start)
    return rows, meta


def kernel_bench_heading(meta: dict, title: str) -> str:
    """A kernel benchmark's markdown title and run line: what ran, where, when, with which
    versions and dtype (the caller continues the run line with "; ...")."""
    return (f"# {title} ({meta['device']}, {meta['date']})\n\n`{meta['command']}`; torch "
            f"{meta['torch']}, triton {meta['triton']}, {meta['dtype']}")


def exit_if_off_reference(rows: list[dict], key: str, tol: float, what: str) -> None:
    """The one-line error of a kernel benchmark whose kernel's error (rows' `key`) against the
    fp32 reference exceeds `tol` in some cell."""
    bad = [r for r in rows if r[key] > tol]
    if bad:
        raise SystemExit(f"moeflow: error: {what} off the fp32 reference by more than {tol} in "
                         f"{len(bad)} cells")


def kernel_bench_parser(doc: str, smoke_help: str = "tiny shapes on the CPU (interpreter)"
                        ) -> argparse.ArgumentParser:
    """A kernel benchmark's command line: --out DIR, --smoke (add the script's own options)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    return ap


def write_kernel_bench(out: Path, name: str, meta: dict, rows: list[dict], md: str) -> None:
    """OUT/name.json ({"meta", "rows"}) and OUT/name.md, and the markdown printed."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / f"{name}.md").write_text(md)
    print(md)
