"""What one eager MoE-layer call costs the host, and what each kind of launch costs it: the
small-T cells of benchmarks/moe_layer.py are bound by the GPU host's Python, not the GPU.

Per cell (shape:T:mode, moeflow and the minimal layer): the host time to issue one call (the
GPU is first given ~20 ms of queued work so issuing never waits for it: the mean over 20 calls
of the wall time between issuing and the end of the issue; for fwd+bwd cells also split into
the forward's and the backward's issue time), the CUDA-event time of
benchmarks/moe_layer.py, and, for moeflow, the top functions by cumulative time under cProfile.
Then the unit costs on this host, each the mean issue time over 2000 calls: torch.empty,
torch.zeros, a view, a small torch.mm, a Triton launch of a kernel with 4 and with 16 arguments,
and the same 16-argument kernel behind triton.autotune (one config).
`--timeline`: instead, for each cell's moeflow call, the device timeline of one eager call
(torch.profiler): each kernel's start offset, duration and the idle gap before it, next to the
CUDA-graph replay time of the same call (its GPU time without host gaps; forward cells only).

    PYTHONPATH=. python benchmarks/host_cost_probe.py [--cells qwen3-30b-a3b:128:fwd ...]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
import triton
import triton.language as tl

from benchmarks.machine import cuda_kernel_events
from benchmarks.moe_layer import SHAPES, build, run_cell

CELLS = ("qwen3-30b-a3b:128:fwd", "ds-1.3b+moe128:8:fwd", "qwen3-30b-a3b:8:fwd+bwd",
         "qwen3-30b-a3b:128:fwd+bwd", "qwen3-30b-a3b:8:fwd")


@triton.jit
def _k4(a, b, n, m, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(b + i, tl.load(a + i, mask=i < n) + m, mask=i < n)


@triton.jit
def _k16(a, b, c, d, e, f, g, h, n0, n1, n2, n3, n4, n5, n6, n7, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(b + i, tl.load(a + i, mask=i < n0) + n1 + n2 + n3 + n4 + n5 + n6 + n7, mask=i < n0)


_k16_tuned = triton.autotune(configs=[triton.Config({"BLOCK": 64})], key=["n0"])(_k16)


def _busy() -> None:
    """~20 ms of queued GPU work, so the timed issues never wait for the device."""
    a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
    for _ in range(20):
        a = a @ a
        a = a / a.norm()


def issue_ms(fn, calls: int) -> float:
    torch.cuda.synchronize()
    _busy()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    t = (time.perf_counter() - t0) / calls * 1e3
    torch.cuda.synchronize()
    return t


def issue_split_ms(fn, params, x, g, calls: int) -> tuple[float, float]:
    """Host issue ms of a fwd+bwd call's forward (autograd recording) and of its backward
    alone: `calls` forwards are issued and kept, then their backwards (each after the
    parameters' gradients are reset, as a step does)."""
    torch.cuda.synchronize()
    _busy()
    t0 = time.perf_counter()
    outs = [fn(x) for _ in range(calls)]
    t1 = time.perf_counter()
    for y in outs:
        for p in params:
            p.grad = None
        x.grad = None
        y.backward(g)
    t2 = time.perf_counter()
    torch.cuda.synchronize()
    return (t1 - t0) / calls * 1e3, (t2 - t1) / calls * 1e3


def _step(fn, params, x, g, mode):
    if mode == "fwd":
        def step():
            with torch.no_grad():
                fn(x)
    else:
        def step():
            for p in params:
                p.grad = None
            x.grad = None
            fn(x).backward(g)
    return step


def timeline(cell: str) -> None:
    shape, T, mode = cell.split(":")
    fn, mod = build("moeflow", shape)
    params = list(mod.parameters())
    x = torch.randn(int(T), SHAPES[shape][0], device="cuda", dtype=torch.bfloat16,
                    requires_grad=mode != "fwd")
    g = torch.randn_like(x)
    event = run_cell(fn, params, x, g, mode)
    graph = run_cell(fn, params, x.detach(), g, mode, graph=True) if mode == "fwd" else None
    step = _step(fn, params, x, g, mode)
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    kernels = cuda_kernel_events(step)
    t0, prev_end = kernels[0].time_range.start, kernels[0].time_range.start
    busy = sum(k.time_range.elapsed_us() for k in kernels)
    span = kernels[-1].time_range.end - t0
    print(f"== {cell} moeflow: event {event:.3f} ms, graph replay "
          f"{'-' if graph is None else f'{graph:.3f}'} ms; one eager call: {len(kernels)} "
          f"kernels, {busy:.0f} µs busy over a {span:.0f} µs span", flush=True)
    for k in kernels:
        start = k.time_range.start
        print(f"  +{start - t0:7.1f} gap {start - prev_end:6.1f} dur "
              f"{k.time_range.elapsed_us():7.1f}  {k.name[:70]}")
        prev_end = max(prev_end, k.time_range.end)
    del fn, mod, params
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="*", default=list(CELLS))
    ap.add_argument("--timeline", action="store_true")
    args = ap.parse_args()
    if args.timeline:
        for cell in args.cells:
            timeline(cell)
        return
    for cell in args.cells:
        shape, T, mode = cell.split(":")
        D = SHAPES[shape][0]
        for impl in ("moeflow", "minimal"):
            fn, mod = build(impl, shape)
            params = list(mod.parameters())
            x = torch.randn(int(T), D, device="cuda", dtype=torch.bfloat16,
                            requires_grad=mode != "fwd")
            g = torch.randn_like(x)
            event = run_cell(fn, params, x, g, mode)
            step = _step(fn, params, x, g, mode)
            issue = issue_ms(step, 20)
            split = ""
            if mode != "fwd":
                fwd_ms, bwd_ms = issue_split_ms(fn, params, x, g, 10)
                split = f" (forward {fwd_ms:.3f}, backward {bwd_ms:.3f})"
            print(f"{cell} {impl}: event {event:.3f} ms, host issue {issue:.3f} ms/call{split}",
                  flush=True)
            if impl == "moeflow":
                torch.cuda.synchronize()
                _busy()
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(10):
                    step()
                prof.disable()
                torch.cuda.synchronize()
                out = io.StringIO()
                pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(28)
                print(out.getvalue().split("\n", 6)[-1], flush=True)
            del fn, mod, params
            torch.cuda.empty_cache()

    a = torch.zeros(64, device="cuda")
    b = torch.empty_like(a)
    w = torch.randn(128, 2048, device="cuda", dtype=torch.bfloat16)
    xs = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    units = {
        "torch.empty": lambda: torch.empty(128, 2048, device="cuda", dtype=torch.bfloat16),
        "torch.zeros": lambda: torch.zeros(128, device="cuda", dtype=torch.int32),
        "view": lambda: w.view(2048, 128),
        "torch.mm 8x2048x128": lambda: torch.mm(xs, w.t()),
        "triton 4 args": lambda: _k4[(1,)](a, b, 64, 1.0, BLOCK=64),
        "triton 16 args": lambda: _k16[(1,)](a, b, a, b, a, b, a, b, 64, 1, 2, 3, 4, 5, 6, 7,
                                            BLOCK=64),
        "triton 16 args, autotuned": lambda: _k16_tuned[(1,)](a, b, a, b, a, b, a, b, 64, 1, 2,
                                                            3, 4, 5, 6, 7),
    }
    for name, fn in units.items():
        fn()
        print(f"unit {name}: {issue_ms(fn, 2000) * 1e3:.1f} µs per call", flush=True)


if __name__ == "__main__":
    main()
