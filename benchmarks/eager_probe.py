"""Why the small-T eager cells of benchmarks/moe_layer.py move between runs: for a few cells,
the CUDA-event time (benchmarks.moe_layer.time_fn) three times in one process, the wall time per
call, the kernels of one call with their GPU time, and the stream kernels' autotuned configs.

    PYTHONPATH=. python benchmarks/eager_probe.py        # one GPU; prints

Session 10 (H200, 2026-12-02, results/moe_layer/eager_probe_*): the GPU work of Qwen3-30B-A3B
T = 128 is 0.36-0.38 ms per call in every process while the eager time moved 0.85-1.41 ms, so
those cells measure the host.
"""

import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.moe_layer import SHAPES, build, time_fn
from moeflow.ops import grouped_mlp_triton

CELLS = (("qwen3-30b-a3b", 128), ("ds-1.3b+moe128", 8), ("qwen3-30b-a3b", 8))


def main() -> None:
    for shape, T in CELLS:
        fn, _ = build("moeflow", shape)
        x = torch.randn(T, SHAPES[shape][0], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            event_ms = [time_fn(lambda: fn(x)) for _ in range(3)]
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(50):
                fn(x)
            torch.cuda.synchronize()
            wall_ms = (time.perf_counter() - t0) / 50 * 1e3
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    fn(x)
                torch.cuda.synchronize()
        kernels = sorted(((e.key[:50], e.count // 5, round(e.device_time_total / 5, 1))
                          for e in prof.key_averages() if e.device_time_total > 0),
                         key=lambda r: -r[2])
        print(f"== {shape} T={T}: event ms {[round(m, 3) for m in event_ms]}, wall per call "
              f"{wall_ms:.3f} ms")
        print("   up", grouped_mlp_triton._up_kernel.best_config,
              "down", grouped_mlp_triton._down_kernel.best_config)
        for k in kernels:
            print("  ", k)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
