"""Decode expert MLP alone: the stream kernels vs the split-K ones, at batch 1, 4 and 16.

Issue 14: at batch-1 decode of Qwen3-30B-A3B the stream path's up kernel read its weights at
2.66 TB/s and its down kernel at 2.25 TB/s on an H200 (decode_study, 2026-12-02).
`Backends(experts="stream_splitk")` (moeflow.ops.stream_splitk_triton) splits the up
projection along D and launches programs only for busy experts; this measures whether that
reads the weights faster. Per shape (Qwen3-30B-A3B: D 2048, F 768, 128 experts, top-8;
Mixtral-8x7B: D 4096, F 14336, 8 experts, top-2; SwiGLU, bf16) and batch T:
- each layer gets its own weights and its own random top-k routing (distinct experts per
  token), and the call gathers its rows from the tokens (rows_N), as a decode step does;
- one CUDA graph of `layers` calls (one per layer, so the weights are not in L2 between calls),
  replayed REPS times and timed with CUDA events: median µs per call;
- bytes = the busy experts' w_in and w_out (activations and partials are < 1 % of it),
  TB/s = bytes / time, set against a measured copy ceiling (bytes read + written / time);
- µs of each kernel from a profile of eager calls (the issue's figures are per kernel);
- the autotuner's choices, and the outputs of both paths against each other and against the
  fp32 reference on layer 0.

    PYTHONPATH=. python benchmarks/decode_experts.py --out $OUT          # one H200: ~1-2 min
    PYTHONPATH=. python benchmarks/decode_experts.py --out $OUT --sweep  # + fixed SPLIT_K 1-8
    PYTHONPATH=. python benchmarks/decode_experts.py --smoke --out /tmp/e  # CPU, interpreter

writes OUT/decode_experts.{json,md}. --smoke runs tiny fp32 shapes through Triton's interpreter
on the CPU (timings meaningless: it only shows the script runs). The whole-model effect is
decode_study.py's: `--variant stream=experts:stream --variant splitk=experts:stream_splitk`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_attention import copy_ceiling_gbps, time_per_call  # noqa: E402

from moeflow.ops import grouped_mlp_triton  # noqa: E402
from moeflow.ops.expert_mlp import expert_mlp_reference  # noqa: E402
from moeflow.ops.grouped_mlp_triton import expert_mlp_stream  # noqa: E402
from moeflow.ops.stream_splitk_triton import (  # noqa: E402
    SplitKLaunch, expert_mlp_stream_splitk, tuned_configs)


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
# --sweep: fixed launches per SPLIT_K, blocks from the autotuned lists (sweep_launch).
SWEEP_SPLITS = (1, 2, 4, 8)
KERNELS = {"stream": ("_up_kernel", "_down_kernel"),
           "splitk": ("_up_partials_kernel", "_down_from_partials_kernel")}


def sweep_launch(split_k: int, smoke: bool) -> SplitKLaunch:
    if smoke:
        return SplitKLaunch(split_k=split_k)
    return SplitKLaunch(split_k=split_k, up_block_n=64, up_block_k=128, up_stages=3,
                        down_block_n=32, down_block_k=64, down_stages=2)


def routing(sh: Shape, T: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(ends_E, rows_N, busy experts) of a random top-k routing of T tokens, rows sorted by
    expert as moeflow.model.dispatch lays them out."""
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.rand(T, sh.E, generator=g).topk(sh.top_k, dim=1).indices
    order_N = torch.argsort(ids_TK.reshape(-1), stable=True)
    counts_E = torch.bincount(ids_TK.reshape(-1), minlength=sh.E)
    return (torch.cumsum(counts_E, 0).to(device), (order_N // sh.top_k).to(device),
            int((counts_E > 0).sum()))


def kernel_us(fn, calls: int, names: tuple[str, ...]) -> dict[str, float]:
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


def layer_calls(kernel, x_TD, plans, w_in, w_out, **kw):
    """One decode step's expert calls, one per layer, each with its own weights and routing."""
    def run():
        for layer, (ends, rows_N, _) in enumerate(plans):
            kernel(x_TD, ends, w_in[layer], None, w_out[layer], None, "swiglu", False,
                   rows_N=rows_N, **kw)
    return run


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def measure_shape(sh: Shape, batches, dtype, device, sweep: bool, smoke: bool) -> list[dict]:
    I = 2 * sh.F
    torch.manual_seed(0)
    w_in = [torch.randn(sh.E, sh.D, I, device=device, dtype=dtype) * sh.D ** -0.5
            for _ in range(sh.layers)]
    w_out = [torch.randn(sh.E, sh.F, sh.D, device=device, dtype=dtype) * sh.F ** -0.5
             for _ in range(sh.layers)]
    expert_bytes = (sh.D * I + sh.F * sh.D) * w_in[0].element_size()
    rows = []
    for T in batches:
        x_TD = torch.randn(T, sh.D, device=device, dtype=dtype)
        plans = [routing(sh, T, seed=1000 * T + layer, device=device)
                 for layer in range(sh.layers)]
        busy = sum(p[2] for p in plans)
        row = {"shape": sh.name, "T": T, "rows": T * sh.top_k,
               "busy_experts_per_layer": busy / sh.layers,
               "weight_bytes_per_call": busy * expert_bytes / sh.layers,
               "up_bytes_per_call": busy * sh.D * I * w_in[0].element_size() / sh.layers,
               "down_bytes_per_call": busy * sh.F * sh.D * w_in[0].element_size() / sh.layers}

        def step(kernel, plans=plans, x_TD=x_TD, **kw):
            return layer_calls(kernel, x_TD, plans, w_in, w_out, **kw)

        with torch.no_grad():
            ends, rows_N, _ = plans[0]
            args = (x_TD, ends, w_in[0], None, w_out[0], None, "swiglu", False)
            y = {"stream": expert_mlp_stream(*args, rows_N=rows_N),
                 "splitk": expert_mlp_stream_splitk(*args, rows_N=rows_N)}
            if device.type == "cuda":
                row["splitk_configs"] = tuned_configs()
                row["stream_configs"] = {
                    "up": str(grouped_mlp_triton._up_kernel.best_config),
                    "down": str(grouped_mlp_triton._down_kernel.best_config)}
            truth = expert_mlp_reference(x_TD.float(), ends, w_in[0].float(), None,
                                         w_out[0].float(), None, "swiglu", False, rows_N=rows_N)
            row["rel_err_splitk_vs_stream"] = rel(y["splitk"], y["stream"])
            for path in ("stream", "splitk"):
                row[f"rel_err_{path}_vs_fp32"] = rel(y[path], truth)
            for path, kernel in (("stream", expert_mlp_stream),
                                 ("splitk", expert_mlp_stream_splitk)):
                us = time_per_call(step(kernel), sh.layers, device, REPS)
                row[f"{path}_us"] = us
                row[f"{path}_tbps"] = row["weight_bytes_per_call"] / us / 1e6
                if device.type == "cuda":
                    for name, k_us in kernel_us(step(kernel), sh.layers,
                                                KERNELS[path]).items():
                        part = "up" if name == KERNELS[path][0] else "down"
                        row[f"{path}_{part}_kernel_us"] = k_us
                        row[f"{path}_{part}_kernel_tbps"] = (
                            row[f"{part}_bytes_per_call"] / k_us / 1e6 if k_us else None)
            row["speedup"] = row["stream_us"] / row["splitk_us"]
            if sweep:
                for s in SWEEP_SPLITS:
                    launch = sweep_launch(s, smoke)
                    row[f"splitk_fixed_s{s}_us"] = time_per_call(
                        step(expert_mlp_stream_splitk, launch=launch), sh.layers, device, REPS)
        rows.append(row)
        print(f"{sh.name} T={T:2d}: {row['busy_experts_per_layer']:5.1f} busy experts, "
              f"{row['weight_bytes_per_call'] / 1e6:7.1f} MB/call; stream {row['stream_us']:8.1f}"
              f" µs ({row['stream_tbps']:.2f} TB/s), splitk {row['splitk_us']:8.1f} µs "
              f"({row['splitk_tbps']:.2f} TB/s), {row['speedup']:.2f}x; rel err splitk-stream "
              f"{row['rel_err_splitk_vs_stream']:.1e}", flush=True)
    return rows


def fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def table(rows: list[dict], ceiling: float | None, sweep: bool, smoke: bool) -> str:
    frac = (lambda tbps: f" ({tbps * 1e3 / ceiling:.0%})") if ceiling else (lambda tbps: "")
    out = ("| shape | T | busy experts | MB of weights / call | stream µs | stream TB/s | splitk µs"
           " | splitk TB/s | speedup | stream up / down kernel µs (TB/s) | splitk up / down "
           "kernel µs (TB/s) | rel err splitk-stream / stream-fp32 / splitk-fp32 |\n"
           "|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    for r in rows:
        kernels = []
        for path in ("stream", "splitk"):
            k = [(r.get(f"{path}_{p}_kernel_us"), r.get(f"{path}_{p}_kernel_tbps"))
                 for p in ("up", "down")]
            kernels.append(" / ".join(f"{fmt(us)} ({fmt(tb, '.2f')})" for us, tb in k))
        out += (f"| {r['shape']} | {r['T']} | {r['busy_experts_per_layer']:.1f} | "
                f"{r['weight_bytes_per_call'] / 1e6:.1f} | {r['stream_us']:.1f} | "
                f"{r['stream_tbps']:.2f}{frac(r['stream_tbps'])} | {r['splitk_us']:.1f} | "
                f"{r['splitk_tbps']:.2f}{frac(r['splitk_tbps'])} | {r['speedup']:.2f}x | "
                f"{kernels[0]} | {kernels[1]} | {r['rel_err_splitk_vs_stream']:.1e} / "
                f"{r['rel_err_stream_vs_fp32']:.1e} / {r['rel_err_splitk_vs_fp32']:.1e} |\n")
    if sweep:
        fixed = sweep_launch(1, smoke)
        out += (f"\nFixed launches (up {fixed.up_block_n}×{fixed.up_block_k}, {fixed.up_stages} "
                f"stages; down {fixed.down_block_n}×{fixed.down_block_k}, {fixed.down_stages} "
                "stages), µs per call by SPLIT_K:\n\n| shape | T | autotuned | "
                + " | ".join(f"S={s}" for s in SWEEP_SPLITS) + " |\n|---|---|---|"
                + "---|" * len(SWEEP_SPLITS) + "\n")
        for r in rows:
            out += (f"| {r['shape']} | {r['T']} | {r['splitk_us']:.1f} | "
                    + " | ".join(f"{r[f'splitk_fixed_s{s}_us']:.1f}" for s in SWEEP_SPLITS)
                    + " |\n")
    configs = [r for r in rows if "splitk_configs" in r]
    if configs:
        out += "\nAutotuned configs:\n\n"
        for r in configs:
            out += (f"- {r['shape']} T={r['T']}: splitk up {r['splitk_configs']['up']}; down "
                    f"{r['splitk_configs']['down']}; stream up {r['stream_configs']['up']}; "
                    f"down {r['stream_configs']['down']}\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (interpreter)")
    ap.add_argument("--sweep", action="store_true",
                    help=f"also time fixed launches with SPLIT_K in {SWEEP_SPLITS}")
    args = ap.parse_args()
    t_start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("moeflow: error: no CUDA device; run with --smoke for the CPU check")
    shapes, batches = (SMOKE_SHAPES, SMOKE_BATCHES) if args.smoke else (SHAPES, BATCHES)
    dtype = torch.float32 if args.smoke else torch.bfloat16  # the interpreter's dot: no bf16
    ceiling = copy_ceiling_gbps(device)
    rows = []
    for sh in shapes:
        rows += measure_shape(sh, batches, dtype, device, args.sweep, args.smoke)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the shape's weights, freed on return
    meta = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "triton": __import__("triton").__version__,
            "command": " ".join(["python"] + sys.argv), "dtype": str(dtype),
            "shapes": [asdict(s) for s in shapes], "reps": REPS,
            "copy_ceiling_gbps": ceiling, "seconds": time.perf_counter() - t_start}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "decode_experts.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                             indent=1))
    md = (f"# Decode expert MLP: stream vs stream_splitk ({meta['device']}, {meta['date']})\n\n"
          f"`{meta['command']}`; torch {meta['torch']}, triton {meta['triton']}, {dtype}, "
          f"SwiGLU, rows gathered from the tokens; median of {REPS} graph replays per call; copy "
          f"ceiling {'-' if ceiling is None else f'{ceiling:.0f} GB/s'} (TB/s in brackets: "
          "its fraction).\n\n" + table(rows, ceiling, args.sweep, args.smoke))
    (args.out / "decode_experts.md").write_text(md)
    print(md)
    print(f"total {meta['seconds']:.1f} s")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    bad = [r for r in rows if r["rel_err_splitk_vs_fp32"] > tol]
    if bad:
        raise SystemExit(f"moeflow: error: stream_splitk is off the fp32 reference by more than "
                         f"{tol} in {len(bad)} cells")


if __name__ == "__main__":
    main()
