"""Decode-sized dense projections: cuBLAS (F.linear) vs the weight-streaming kernel
(moeflow.ops.skinny_linear_triton.linear_stream, `Backends(matmul="stream")`).

At decode a projection reads its whole weight for a few rows, so its floor is the weight's
bytes over the bandwidth; the H200 profile of 2026-12-02 had cuBLAS at 2.0–2.7 TB/s on the
Qwen3-30B-A3B attention projections, against a ~4.2 TB/s copy. Per shape (the attention's qkv
and output projections of Qwen3-30B-A3B: K 2048 -> N 5120, K 4096 -> N 2048; of Mixtral-8x7B:
K 4096 -> N 6144, K 4096 -> N 4096; bf16, no bias) and rows M:
- `copies` weights of the shape, so that a call's weight is not in L2 from the previous call of
  it: one CUDA graph of one call per copy, replayed REPS times and timed with CUDA events;
  median µs per call, for F.linear and linear_stream;
- TB/s = weight bytes / time, and its fraction of a measured copy ceiling (bytes read + written
  / time of a large device-to-device copy);
- the autotuner's choice for the shape and M, and each path's max |y - y_fp32| / max |y_fp32|
  on copy 0 against F.linear in fp32.

    PYTHONPATH=. python benchmarks/skinny_linear.py --out $OUT            # one H200: ~30 s
    PYTHONPATH=. python benchmarks/skinny_linear.py --smoke --out /tmp/s  # CPU, interpreter

writes OUT/skinny_linear.{json,md}. --smoke runs tiny fp32 shapes through Triton's interpreter on
the CPU (timings meaningless: it only shows the script runs and the output is right). The H200
run of 2026-12-02 is in benchmarks/results/skinny_linear/.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_cpu  # noqa: E402, F401  (before the kernels: the interpreter without CUDA)
from decode_attention import copy_ceiling_gbps, time_per_call  # noqa: E402
from machine import (exit_if_off_reference, kernel_bench_heading,  # noqa: E402
                     kernel_bench_parser, measure_shapes, write_kernel_bench)

from moeflow.ops import skinny_linear_triton  # noqa: E402
from moeflow.ops.skinny_linear_triton import linear_stream  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    K: int
    N: int
    copies: int  # weights in one graph: their bytes well above the 50 MB of L2


SHAPES = (Shape("qwen3-30b-a3b qkv", 2048, 5120, copies=32),  # 21 MB each
          Shape("qwen3-30b-a3b o", 4096, 2048, copies=32),  # 16.8 MB
          Shape("mixtral-8x7b qkv", 4096, 6144, copies=16),  # 50 MB
          Shape("mixtral-8x7b o", 4096, 4096, copies=16))  # 33.6 MB
SMOKE_SHAPES = (Shape("smoke qkv", 64, 80, copies=2), Shape("smoke o", 96, 48, copies=2))
ROWS, SMOKE_ROWS = (1, 4, 16), (1, 4)
REPS = 50
PATHS = {"f_linear": F.linear, "stream": linear_stream}


def max_rel_err(y: torch.Tensor, truth: torch.Tensor) -> float:
    return float((y.float() - truth).abs().max() / truth.abs().max())


def chosen_config(device, rows: int, sh) -> str:
    """The launch config of the kernel linear_stream ran for `rows` rows (one row: the register
    GEMV, more: the MMA kernel)."""
    m = skinny_linear_triton
    if device.type != "cuda":
        blocks = m.GEMV_INTERPRETER_BLOCKS if rows == 1 else m.INTERPRETER_BLOCKS
        return "interpreter: " + ", ".join(f"{k} {v}" for k, v in blocks.items())
    if rows == 1:
        return "gemv " + str(m.gemv_config(sh.N, sh.K))
    return "mma " + str(m.linear_config(sh.N, sh.K))


def measure_shape(sh: Shape, rows, dtype, device) -> list[dict]:
    torch.manual_seed(0)
    weights = [torch.randn(sh.N, sh.K, device=device, dtype=dtype) * sh.K ** -0.5
               for _ in range(sh.copies)]
    weight_bytes = weights[0].numel() * weights[0].element_size()
    out = []
    for M in rows:
        x = torch.randn(M, sh.K, device=device, dtype=dtype)
        truth = F.linear(x.float(), weights[0].float())
        row = {"shape": sh.name, "K": sh.K, "N": sh.N, "M": M, "weight_bytes": weight_bytes}
        for path, fn in PATHS.items():
            row[f"{path}_max_rel_err"] = max_rel_err(fn(x, weights[0]), truth)
            if path == "stream":
                row["config"] = chosen_config(device, M, sh)  # GEMV: autotuned by that call

            def calls(fn=fn):
                for w in weights:
                    fn(x, w)
            us = time_per_call(calls, sh.copies, device, REPS)
            row[f"{path}_us"] = us
            row[f"{path}_tbps"] = weight_bytes / us / 1e6
        row["speedup"] = row["f_linear_us"] / row["stream_us"]
        out.append(row)
        print(f"{sh.name} M={M:2d}: F.linear {row['f_linear_us']:7.1f} µs "
              f"({row['f_linear_tbps']:.2f} TB/s), stream {row['stream_us']:7.1f} µs "
              f"({row['stream_tbps']:.2f} TB/s), {row['speedup']:.2f}x", flush=True)
    return out


def table(rows: list[dict], ceiling: float | None) -> str:
    def tbps(v: float) -> str:
        return f"{v:.2f}" + (f" ({v * 1e3 / ceiling:.0%})" if ceiling else "")

    out = ("| shape | K -> N | M | MB of weight | F.linear µs | F.linear TB/s | stream µs "
           "| stream TB/s | speedup | max rel err F.linear / stream | stream config |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        out += (f"| {r['shape']} | {r['K']} -> {r['N']} | {r['M']} | "
                f"{r['weight_bytes'] / 1e6:.1f} | {r['f_linear_us']:.1f} | "
                f"{tbps(r['f_linear_tbps'])} | {r['stream_us']:.1f} | {tbps(r['stream_tbps'])} | "
                f"{r['speedup']:.2f}x | {r['f_linear_max_rel_err']:.1e} / "
                f"{r['stream_max_rel_err']:.1e} | {r['config']} |\n")
    return out


def main() -> None:
    args = kernel_bench_parser(__doc__).parse_args()
    rows = SMOKE_ROWS if args.smoke else ROWS
    results, meta = measure_shapes(args.smoke, SHAPES, SMOKE_SHAPES,
                                   lambda sh, dtype, device: measure_shape(sh, rows, dtype, device),
                                   REPS, copy_ceiling_gbps)
    ceiling = meta["copy_ceiling_gbps"]
    timing = (f"µs / call: median of {REPS} replays of a graph of one call per weight copy"
              if meta["device"] != "cpu" else
              "µs / call: one eager run (the kernel through the interpreter): meaningless")
    md = (kernel_bench_heading(meta, "Decode-sized linears: F.linear (cuBLAS) vs the stream "
                               "kernel")
          + f", no bias; {timing}; TB/s of the weight's bytes, copy ceiling "
          f"{'-' if ceiling is None else f'{ceiling:.0f} GB/s'} (in brackets: its fraction); "
          "max rel err = max |y - y_fp32| / max |y_fp32|.\n\n" + table(results, ceiling))
    write_kernel_bench(args.out, "skinny_linear", meta, results, md)
    print(f"total {meta['seconds']:.1f} s; median speedup "
          f"{statistics.median(r['speedup'] for r in results):.2f}x")
    exit_if_off_reference(results, "stream_max_rel_err", 1e-5 if args.smoke else 1e-2,
                          "the stream kernel is")


if __name__ == "__main__":
    main()
