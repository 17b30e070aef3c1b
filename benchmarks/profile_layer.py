"""Where one moeflow MoE layer call spends its GPU time: a per-kernel breakdown (torch.profiler),
to find what separates a cell of benchmarks/moe_layer.py from its floor.

    PYTHONPATH=. python benchmarks/profile_layer.py \
        --cells qwen3-30b-a3b:8:fwd mixtral-8x7b:16384:fwd+bwd qwen3-30b-a3b:8:fwd:hf-grouped_mm

Each cell is shape:T:mode[:impl] with the shapes and implementations of benchmarks/moe_layer.py
(impl defaults to moeflow). Prints, per cell, the kernels sorted by total CUDA time over a few
calls. `--host`: instead, where the host's time goes in eager calls (small T is bound by it):
cProfile over `--reps` calls, the Python functions by own time, with the wall time per call.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.moe_layer import SHAPES, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", nargs="+", required=True)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--host", action="store_true", help="profile the host (cProfile) instead")
    args = ap.parse_args()
    built = {}
    for cell in args.cells:
        shape, T, mode, impl = (cell.split(":") + ["moeflow"])[:4]
        T = int(T)
        if (shape, impl) not in built:
            built.clear()
            torch.cuda.empty_cache()
            built[shape, impl] = build(impl, shape)
        fn, mod = built[shape, impl]
        x = torch.randn(T, SHAPES[shape][0], device="cuda", dtype=torch.bfloat16,
                        requires_grad=mode != "fwd")
        g = torch.randn_like(x)

        def step():
            if mode == "fwd":
                with torch.no_grad():
                    fn(x)
            else:
                mod.zero_grad(set_to_none=True)
                fn(x).backward(g)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        if args.host:
            t0 = time.perf_counter()
            with cProfile.Profile() as host:
                for _ in range(args.reps):
                    step()
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3 / args.reps
            print(f"=== {cell} host profile ({args.reps} calls, {ms:.3f} ms per call under "
                  f"cProfile)")
            pstats.Stats(host).sort_stats("tottime").print_stats(args.rows)
            continue
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.reps):
                step()
            torch.cuda.synchronize()
        print(f"=== {cell} ({args.reps} calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows,
                                        max_name_column_width=60))


if __name__ == "__main__":
    main()
