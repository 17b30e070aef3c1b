"""Decode expert MLP alone: the stream kernels' time per call and per kernel, at batch 1, 4 and 16.

Issue 14 asks batch-1 decode to run at 1.75× its bandwidth floor, and at decode the expert MLP is
bound by reading the busy experts' weights once. This measures how far the stream path
(`Backends(experts="stream")`, moeflow.ops.grouped_mlp_triton.expert_mlp_stream: an up kernel
that gathers its rows and applies the activation, then a down kernel) and each of its two
kernels are from the copy ceiling. Per shape (Qwen3-30B-A3B: D 2048, F 768, 128 experts, top-8;
Mixtral-8x7B: D 4096, F 14336, 8 experts, top-2; SwiGLU, bf16) and batch T:
- each layer gets its own weights and its own random top-k routing (distinct experts per
  token), and the call gathers its rows from the tokens (rows_N), as a decode step does;
- one CUDA graph of `layers` calls (one per layer, so the weights are not in L2 between calls),
  replayed REPS times and timed with CUDA events: median µs per call;
- bytes = the busy experts' w_in and w_out (activations are < 1 % of it), TB/s = bytes / time,
  set against a measured copy ceiling (bytes read + written / time);
- µs of the up and the down kernel from a profile of eager calls, each with the TB/s of the
  weights it reads (w_in, w_out);
- the autotuner's choices, and the output on layer 0 against the fp32 reference.

    PYTHONPATH=. python benchmarks/decode_experts.py --out $OUT            # one H200: ~1 min
    PYTHONPATH=. python benchmarks/decode_experts.py --smoke --out /tmp/e  # CPU, interpreter

writes OUT/decode_experts.{json,md}. --smoke runs tiny fp32 shapes through Triton's interpreter
on the CPU (timings meaningless: it only shows the script runs and the output is right). The
whole-model effect is decode_study.py's. A split-K variant once compared here lost to the
stream kernels and was removed (benchmarks/NOTES-kernels.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_cpu  # noqa: E402, F401  (before the kernels: the interpreter without CUDA)
from decode_attention import copy_ceiling_gbps, time_per_call  # noqa: E402
from machine import (exit_if_off_reference, kernel_bench_heading,  # noqa: E402
                     kernel_bench_parser, measure_shapes, write_kernel_bench)

from moeflow.ops import grouped_mlp_triton  # noqa: E402
from moeflow.ops.expert_mlp import expert_mlp_reference  # noqa: E402
from moeflow.ops.grouped_mlp_triton import expert_mlp_stream, stream_counters  # noqa: E402


@dataclass(frozen=True)
class Shape:
    name: str
    D: int
    F: int
    E: int
    top_k: int
    layers: int  # weight copies in one graph: more than L2 holds between two calls of a layer


SHAPES = (Shape("qwen3-30b-a3b", 2048, 768, 128, 8, layers=8),  # 1.2 GB of experts per layer
          Shape("mixtral-8x7b", 4096, 14336, 8, 2, layers=2))  # 2.8 GB per layer
SMOKE_SHAPES = (Shape("smoke-qwen", 64, 48, 16, 4, layers=2),
                Shape("smoke-mixtral", 64, 96, 4, 2, layers=2))
BATCHES, SMOKE_BATCHES = (1, 4, 16), (1, 4)
REPS = 50
KERNELS = {"_up_kernel": "up", "_down_kernel": "down"}  # profiler name -> part


def routing(sh: Shape, T: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ends_E, rows_N, busy experts) of a random top-k routing of T tokens, rows sorted by
    expert as moeflow.model.dispatch lays them out."""
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.rand(T, sh.E, generator=g).topk(sh.top_k, dim=1).indices
    order_N = torch.argsort(ids_TK.reshape(-1), stable=True)
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=sh.E)
    return (torch.cumsum(counts_E, 0).to(device), (order_N // sh.top_k).to(device),
            int((counts_E > 0).sum()))


def kernel_us(fn, calls: int, names) -> dict[str, float]:
    """Mean µs per call of each named kernel over 3 eager rounds of `fn`, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    total = dict.fromkeys(names, 0.0)
    for e in prof.key_averages():  # as benchmarks/generate.py's profile_kernels reads them
        if e.key in total:
            total[e.key] += getattr(e, "device_time_total", 0.0)
    return {n: t / (3 * calls) for n, t in total.items()}


def layer_calls(x_TD, plans, w_in, w_out, counters=None):
    """One decode step's expert calls, one per layer, each with its own weights and routing;
    `counters` (one per layer): the up and down kernels in one launch."""
    def run():
        for layer, (ends, rows_N, _) in enumerate(plans):
            expert_mlp_stream(x_TD, ends, w_in[layer], None, w_out[layer], None, "swiglu", False,
                              rows_N=rows_N,
                              counters=None if counters is None else counters[layer])
    return run


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure_shape(sh: Shape, batches, dtype, device) -> list[dict]:
    I = 2 * sh.F
    torch.manual_seed(0)
    w_in = [torch.randn(sh.E, sh.D, I, device=device, dtype=dtype) * sh.D ** -0.5
            for _ in range(sh.layers)]
    w_out = [torch.randn(sh.E, sh.F, sh.D, device=device, dtype=dtype) * sh.F ** -0.5
             for _ in range(sh.layers)]
    size = w_in[0].element_size()
    rows = []
    for T in batches:
        x_TD = torch.randn(T, sh.D, device=device, dtype=dtype)
        plans = [routing(sh, T, seed=1000 * T + layer, device=device)
                 for layer in range(sh.layers)]
        busy = sum(p[2] for p in plans) / sh.layers
        row = {"shape": sh.name, "T": T, "rows": T * sh.top_k, "busy_experts_per_layer": busy,
               "up_bytes_per_call": busy * sh.D * I * size,
               "down_bytes_per_call": busy * sh.F * sh.D * size}
        row["weight_bytes_per_call"] = row["up_bytes_per_call"] + row["down_bytes_per_call"]
        step = layer_calls(x_TD, plans, w_in, w_out)
        with torch.no_grad():
            ends, rows_N, _ = plans[0]
            y = expert_mlp_stream(x_TD, ends, w_in[0], None, w_out[0], None, "swiglu", False,
                                  rows_N=rows_N)
            if device.type == "cuda":
                row["configs"] = {"up": str(grouped_mlp_triton._up_kernel.best_config),
                                  "down": str(grouped_mlp_triton._down_kernel.best_config)}
            truth = expert_mlp_reference(x_TD.float(), ends, w_in[0].float(), None,
                                         w_out[0].float(), None, "swiglu", False, rows_N=rows_N)
            row["rel_err_vs_fp32"] = rel(y, truth)
            row["us"] = time_per_call(step, sh.layers, device, REPS)
            row["tbps"] = row["weight_bytes_per_call"] / row["us"] / 1e6
            # The same calls as one launch each (expert_mlp_stream's counters).
            counters = [stream_counters(sh.E, device) for _ in range(sh.layers)]
            one = expert_mlp_stream(x_TD, ends, w_in[0], None, w_out[0], None, "swiglu", False,
                                    rows_N=rows_N, counters=counters[0])
            row["one_launch_rel_err_vs_fp32"] = rel(one, truth)
            fused = layer_calls(x_TD, plans, w_in, w_out, counters)
            row["one_launch_us"] = time_per_call(fused, sh.layers, device, REPS)
            if device.type == "cuda":
                row["configs"]["one_launch"] = str(
                    grouped_mlp_triton._moe_stream_kernel.best_config)
            if device.type == "cuda":
                for name, us in kernel_us(step, sh.layers, KERNELS).items():
                    part = KERNELS[name]
                    row[f"{part}_kernel_us"] = us
                    row[f"{part}_kernel_tbps"] = (row[f"{part}_bytes_per_call"] / us / 1e6
                                                  if us else None)
        rows.append(row)
        print(f"{sh.name} T={T:2d}: {busy:5.1f} busy experts, "
              f"{row['weight_bytes_per_call'] / 1e6:7.1f} MB/call; {row['us']:8.1f} µs "
              f"({row['tbps']:.2f} TB/s); rel err vs fp32 {row['rel_err_vs_fp32']:.1e}; "
              f"one launch {row['one_launch_us']:8.1f} µs (rel err "
              f"{row['one_launch_rel_err_vs_fp32']:.1e})", flush=True)
    return rows


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict], ceiling: float | None) -> str:
    def tbps(v) -> str:
        if v is None:
            return "-"
        return f"{v:.2f}" + (f" ({v * 1e3 / ceiling:.0%})" if ceiling else "")

    out = ("| shape | T | busy experts | MB of weights / call | µs / call | TB/s | up kernel µs "
           "| up TB/s | down kernel µs | down TB/s | rel err vs fp32 | one launch µs / call "
           "| one launch TB/s |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        out += (f"| {r['shape']} | {r['T']} | {r['busy_experts_per_layer']:.1f} | "
                f"{r['weight_bytes_per_call'] / 1e6:.1f} | {r['us']:.1f} | {tbps(r['tbps'])} | "
                f"{fmt(r.get('up_kernel_us'))} | {tbps(r.get('up_kernel_tbps'))} | "
                f"{fmt(r.get('down_kernel_us'))} | {tbps(r.get('down_kernel_tbps'))} | "
                f"{r['rel_err_vs_fp32']:.1e} | {r['one_launch_us']:.1f} | "
                f"{tbps(r['weight_bytes_per_call'] / r['one_launch_us'] / 1e6)} |\n")
    configs = [r for r in rows if "configs" in r]
    if configs:
        out += "\nAutotuned configs:\n\n"
        for r in configs:
            out += (f"- {r['shape']} T={r['T']}: up {r['configs']['up']}; "
                    f"down {r['configs']['down']}; one launch {r['configs']['one_launch']}\n")
    return out


def main() -> None:
    args = kernel_bench_parser(__doc__).parse_args()
    batches = SMOKE_BATCHES if args.smoke else BATCHES
    rows, meta = measure_shapes(args.smoke, SHAPES, SMOKE_SHAPES,
                                lambda sh, dtype, device: measure_shape(sh, batches, dtype, device),
                                REPS, copy_ceiling_gbps)
    ceiling = meta["copy_ceiling_gbps"]
    timing = (f"µs / call: median of {REPS} graph replays; kernel µs: profile of eager calls"
              if meta["device"] != "cpu" else
              "µs / call: one eager run through the interpreter (meaningless); no kernel profile")
    md = (kernel_bench_heading(meta, "Decode expert MLP, stream kernels") + ", SwiGLU, "
          f"rows gathered from the tokens; {timing}; TB/s of the busy experts' weights "
          "(the up kernel: w_in, the down kernel: w_out); copy ceiling "
          f"{'-' if ceiling is None else f'{ceiling:.0f} GB/s'} (TB/s in brackets: its "
          "fraction).\n\n" + table(rows, ceiling))
    write_kernel_bench(args.out, "decode_experts", meta, rows, md)
    print(f"total {meta['seconds']:.1f} s")
    for key in ("rel_err_vs_fp32", "one_launch_rel_err_vs_fp32"):
        exit_if_off_reference(rows, key, 1e-4 if args.smoke else 2e-2, "the stream kernels are")


if __name__ == "__main__":
    main()
