"""Prefill's experts, forward, at prefill sizes: the tiled Triton grouped GEMM (Backends.experts
"tiled": rows gathered in the up kernel's loads, SwiGLU/GELU before its store), its persistent
twin ("persistent": one program per SM over the tile list, weights through TMA, Hopper only)
and the rows gathered by index, torch._grouped_mm, the one-pass
Triton activation, torch._grouped_mm ("grouped_mm_fused").

Why: on the H200 the expert GEMMs take 19.3 of the 37 ms of a 2048-token prefill of the
Qwen3-30B-A3B shape (benchmarks/results/prefill), and torch._grouped_mm reached 274 TFLOP/s at
that size (~128 rows per expert; 542 at 8192 tokens: benchmarks/results/grouped_mm_layout);
the dispatch gather and the activation pass add 1.2 and 0.8 ms.

Per shape: median ms of each path from the token matrix (gather included) to the expert
outputs in expert order, per call of five back to back (the host's per-call cost hidden, as in
a prefill graph) and of one call, over random top-k routing (per token k distinct experts drawn
uniformly, so experts get uneven row counts as in a real prefill); TFLOP/s; each path's
relative L2 difference from the fp32 reference (moeflow.ops.expert_mlp.expert_mlp_reference on
fp32 copies); the tiled kernels' autotuned configs (the persistent ones have one config each).

    PYTHONPATH=. python benchmarks/prefill_experts.py --out $OUT           # one GPU (sm_90)
    PYTHONPATH=. python benchmarks/prefill_experts.py --smoke --out /tmp/p  # CPU, interpreter

writes OUT/prefill_experts.{json,md}.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import triton_cpu  # noqa: E402, F401  (before the kernels: the interpreter without CUDA)
from machine import (cuda_event_ms, kernel_bench_heading, kernel_bench_parser, measure_shapes,  # noqa: E402
                     write_kernel_bench)

from moeflow.ops import tiled_mlp_triton  # noqa: E402
from moeflow.ops.backend import EXPERT_BACKENDS  # noqa: E402
from moeflow.ops.expert_mlp import expert_mlp_reference  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    D: int
    F: int  # expert ffn dim
    E: int
    top_k: int
    activation: str


SHAPES = tuple(Shape(f"qwen3-30b-a3b, {t} tokens", t, 2048, 768, 128, 8, "swiglu")
               for t in (256, 512, 1024, 2048, 4096, 8192, 16384)) + tuple(
    Shape(f"mixtral-8x7b, {t} tokens", t, 4096, 14336, 8, 2, "swiglu")
    for t in (128, 256, 512, 1024, 2048, 4096, 8192)) + tuple(
    Shape(f"ds-1.3b+moe128, {t} tokens", t, 2048, 8192, 128, 1, "gelu")
    for t in (2048, 4096, 8192, 16384)) + tuple(
    Shape(f"deepseek-v3 experts (64 of 256), {t} tokens", t, 7168, 2048, 64, 8, "swiglu")
    for t in (2048, 8192))
SMOKE_SHAPES = (Shape("smoke", 24, 64, 48, 8, 2, "swiglu"),)
PATHS = ("grouped_mm_fused", "tiled", "persistent")
REPS = 20


def problem(sh: Shape, dtype, device):
    """(x_TD, rows_N, ends_E, weights): tokens, the token of each expert-sorted row, the
    cumulative rows per expert, and (w_in, w_out) scaled like trained weights."""
    g = torch.Generator().manual_seed(sh.tokens)
    ids_TK = torch.rand(sh.tokens, sh.E, generator=g).argsort(dim=1)[:, :sh.top_k]
    order = ids_TK.reshape(-1).argsort(stable=True)
    rows_N = (order // sh.top_k).to(device)
    ends_E = torch.bincount(ids_TK.reshape(-1), minlength=sh.E).cumsum(0).to(device)
    torch.manual_seed(0)
    I = 2 * sh.F if sh.activation == "swiglu" else sh.F
    x_TD = torch.randn(sh.tokens, sh.D, device=device, dtype=dtype)
    w_in = torch.randn(sh.E, sh.D, I, device=device, dtype=dtype) * sh.D ** -0.5
    w_out = torch.randn(sh.E, sh.F, sh.D, device=device, dtype=dtype) * sh.F ** -0.5
    return x_TD, rows_N, ends_E, (w_in, w_out)


def measure(sh: Shape, dtype, device) -> dict:
    x_TD, rows_N, ends_E, (w_in, w_out) = problem(sh, dtype, device)
    rows = rows_N.shape[0]
    I = w_in.shape[2]
    row = {"shape": sh.name, "rows": rows, "rows_per_expert_max": int(ends_E.diff().max()),
           "flops": 2 * rows * (sh.D * I + sh.F * sh.D)}
    ref = expert_mlp_reference(x_TD.float(), ends_E, w_in.float(), None, w_out.float(), None,
                               sh.activation, False, rows_N=rows_N)
    for path in PATHS:
        fn = EXPERT_BACKENDS[path]

        def call(fn=fn):
            return fn(x_TD, ends_E, w_in, None, w_out, None, sh.activation, False, rows_N=rows_N)

        out = call()
        err = float((out.float() - ref).norm() / ref.norm())
        if device.type == "cuda":
            ms = cuda_event_ms(call, REPS, warmup=3)
            # Five calls between the events: the host issues ahead, so its per-call cost
            # drops out, as in a prefill graph (the eager single call pays the host's time to
            # its first launch).
            ms_b2b = cuda_event_ms(lambda: [call() for _ in range(5)], REPS, warmup=1) / 5
        else:
            t0 = time.perf_counter()
            call()
            ms = ms_b2b = (time.perf_counter() - t0) * 1e3
        row[path] = {"ms": ms, "ms_back_to_back": ms_b2b,
                     "tflops": row["flops"] / ms_b2b / 1e9, "rel_err": err}
    if device.type == "cuda":
        row["tiled_configs"] = {k.fn.__name__: str(k.best_config)
                                for k in (tiled_mlp_triton._up_tiled_kernel,
                                          tiled_mlp_triton._down_tiled_kernel)}
    print(f"{sh.name}: " + ", ".join(
        f"{p} {row[p]['ms_back_to_back']:.3f} / {row[p]['ms']:.3f} ms (err "
        f"{row[p]['rel_err']:.1e})" for p in PATHS), flush=True)
    return row


def markdown(meta: dict, rows: list[dict]) -> str:
    out = (kernel_bench_heading(meta, "Prefill experts: tiled Triton grouped GEMM vs grouped_mm")
           + "; from the token matrix to the expert outputs (gather, both GEMMs, "
           "activation), "
           + (f"median of {meta['reps']} CUDA-event-timed calls" if meta["device"] != "cpu"
              else "one call on the CPU (meaningless)") + ".\n\n"
           "| shape | rows (max per expert) | " + " | ".join(
               f"{p} ms back to back / one call (TFLOP/s, rel err)" for p in PATHS)
           + " | fastest back to back |\n"
           "|---|---|" + "---|" * (len(PATHS) + 1) + "\n")
    fastest = lambda r: min(PATHS, key=lambda p: r[p]["ms_back_to_back"])  # noqa: E731
    for r in rows:
        cells = [f"{r[p]['ms_back_to_back']:.3f} / {r[p]['ms']:.3f} ({r[p]['tflops']:.0f}, "
                 f"{r[p]['rel_err']:.1e})" for p in PATHS]
        out += (f"| {r['shape']} | {r['rows']} ({r['rows_per_expert_max']}) | "
                + " | ".join(cells) + f" | {fastest(r)} |\n")
    configs = [f"- {r['shape']}: {r['tiled_configs']}" for r in rows if "tiled_configs" in r]
    if configs:
        out += "\nAutotuned tiles:\n\n" + "\n".join(configs) + "\n"
    return out


def main() -> None:
    args = kernel_bench_parser(__doc__, "tiny fp32 shape on the CPU (interpreter)").parse_args()
    rows, meta = measure_shapes(args.smoke, SHAPES, SMOKE_SHAPES, measure, REPS)
    write_kernel_bench(args.out, "prefill_experts", meta, rows, markdown(meta, rows))


if __name__ == "__main__":
    main()
