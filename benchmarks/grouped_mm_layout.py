"""Prefill's expert GEMMs: torch._grouped_mm with the weight stored as moeflow stores it
([E, K, N], N contiguous) against the transposed storage ([E, N, K], K contiguous, handed over
as a transposed view), forward, at prefill sizes.

Why: on the H200 the two grouped GEMMs of the MoE layers take 19.3 of the 38 ms of a 2048-token
prefill of the Qwen3-30B-A3B shape (benchmarks/results/prefill, 2026-12-02), 1.4× the time their
weight bytes need at the copy rate. Hopper's tensor cores read both operands K-major natively;
which CUTLASS kernel torch picks, and how fast it runs, may depend on the weight's layout. This
measures it before any change to how experts store their weights.

Per shape and layout: median ms of the layer's two GEMMs (up: [N, D] x [E, D, I]; down:
[N, F] x [E, F, D]) over random top-k routing (counts from a multinomial draw, so experts get
uneven row counts as in a real prefill), TFLOP/s and the weight bytes' TB/s, and the max
difference between the layouts' outputs (the same products, so it should be 0 or a few ulps).

    PYTHONPATH=. python benchmarks/grouped_mm_layout.py --out $OUT        # one GPU (sm_90)
    PYTHONPATH=. python benchmarks/grouped_mm_layout.py --smoke --out /tmp/g  # CPU, fp32, tiny

writes OUT/grouped_mm_layout.{json,md}.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.machine import (cuda_event_ms, kernel_bench_heading,  # noqa: E402
                                kernel_bench_parser, measure_shapes, write_kernel_bench)


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int  # prefill tokens; rows = tokens · top_k
    D: int
    F: int  # expert ffn dim; the up GEMM's output is I = 2F (SwiGLU)
    E: int
    top_k: int


SHAPES = (Shape("qwen3-30b-a3b, 2048 tokens", 2048, 2048, 768, 128, 8),
          Shape("qwen3-30b-a3b, 8192 tokens", 8192, 2048, 768, 128, 8),
          Shape("mixtral-8x7b, 2048 tokens", 2048, 4096, 14336, 8, 2))
SMOKE_SHAPES = (Shape("smoke", 32, 64, 32, 8, 2),)
REPS = 20


def routing_ends(sh: Shape, device) -> torch.Tensor:
    """Cumulative rows per expert (int32) of tokens·top_k assignments drawn uniformly."""
    g = torch.Generator().manual_seed(sh.tokens)
    experts = torch.multinomial(torch.ones(sh.E), sh.tokens * sh.top_k, replacement=True,
                                generator=g)
    return torch.bincount(experts, minlength=sh.E).cumsum(0).to(torch.int32).to(device)


def weights(sh: Shape, k_contiguous: bool, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_in [E, D, 2F], w_out [E, F, D]), the same values either way (seeded on the device),
    stored N- or K-contiguous."""
    torch.manual_seed(0)
    w_in = torch.randn(sh.E, sh.D, 2 * sh.F, device=device, dtype=dtype) * sh.D ** -0.5
    w_out = torch.randn(sh.E, sh.F, sh.D, device=device, dtype=dtype) * sh.F ** -0.5
    if k_contiguous:  # store [E, N, K], hand over the [E, K, N] view
        return tuple(w.transpose(1, 2).contiguous().transpose(1, 2) for w in (w_in, w_out))
    return w_in, w_out


def measure(sh: Shape, dtype, device) -> dict:
    ends = routing_ends(sh, device)
    rows = sh.tokens * sh.top_k
    x = torch.randn(rows, sh.D, device=device, dtype=dtype)
    a = torch.randn(rows, sh.F, device=device, dtype=dtype)
    row = {"shape": sh.name, "rows": rows, "rows_per_expert_max": int(ends.diff().max()),
           "flops": 2 * rows * (sh.D * 2 * sh.F + sh.F * sh.D),
           "weight_bytes": sh.E * 3 * sh.D * sh.F * torch.finfo(dtype).bits // 8}
    outs = {}
    for layout, k_contiguous in (("n_contiguous", False), ("k_contiguous", True)):
        w_in, w_out = weights(sh, k_contiguous, dtype, device)

        def gemms(w_in=w_in, w_out=w_out):
            return (torch._grouped_mm(x, w_in, offs=ends), torch._grouped_mm(a, w_out, offs=ends))

        outs[layout] = gemms()
        if device.type == "cuda":
            ms = cuda_event_ms(gemms, REPS, warmup=3)
        else:
            t0 = time.perf_counter()
            gemms()
            ms = (time.perf_counter() - t0) * 1e3
        row[layout] = {"ms": ms, "tflops": row["flops"] / ms / 1e9,
                       "weight_tbps": row["weight_bytes"] / ms / 1e9}
        del w_in, w_out
    row["max_abs_diff"] = max(float((p.float() - q.float()).abs().max())
                              for p, q in zip(outs["n_contiguous"], outs["k_contiguous"]))
    print(f"{sh.name}: N-contiguous {row['n_contiguous']['ms']:.3f} ms, K-contiguous "
          f"{row['k_contiguous']['ms']:.3f} ms, max |diff| {row['max_abs_diff']:.1e}", flush=True)
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    out = (kernel_bench_heading(meta, "torch._grouped_mm by weight layout") + "; the MoE "
           "layer's two "
           "GEMMs (up and down), "
           + (f"median of {meta['reps']} CUDA-event-timed calls" if meta["device"] != "cpu"
              else "one call on the CPU (meaningless)") + ".\n\n"
           "| shape | rows (max per expert) | N-contiguous ms (TFLOP/s, weight TB/s) | "
           "K-contiguous ms (TFLOP/s, weight TB/s) | max abs diff |\n|---|---|---|---|---|\n")
    for r in rows:
        cells = [f"{r[k]['ms']:.3f} ({r[k]['tflops']:.0f}, {r[k]['weight_tbps']:.2f})"
                 for k in ("n_contiguous", "k_contiguous")]
        out += (f"| {r['shape']} | {r['rows']} ({r['rows_per_expert_max']}) | {cells[0]} | "
                f"{cells[1]} | {r['max_abs_diff']:.1e} |\n")
    return out


def main() -> None:
    args = kernel_bench_parser(__doc__, "tiny fp32 shape on the CPU").parse_args()
    rows, meta = measure_shapes(args.smoke, SHAPES, SMOKE_SHAPES, measure, REPS)
    write_kernel_bench(args.out, "grouped_mm_layout", meta, rows, markdown(meta, rows))


if __name__ == "__main__":
    main()
