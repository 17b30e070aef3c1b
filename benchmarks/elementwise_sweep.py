"""Tiles of two memory-bound inference kernels at prefill sizes, swept to pick their defaults.

A 2048-token prefill of the Qwen3-30B-A3B shape (48 layers) spent 0.80 ms in the q/k norm + RoPE
kernel and 1.12 ms in the weighted combine (H200, prefill study of 2026-12-02), below the
copy rate. Both kernels take their tiles as keyword arguments; this times every tile of a grid:
- q/k norm + RoPE (moeflow.ops.qk_rope_triton._launch): q and k as the attention module has
  them, strided head views of the fused qkv projection [1, T, (32 + 4 + 4)·128], per-head norm
  weights, cos/sin [1, T, 128]; tokens per program {1, 2, 4, 8, 16} × heads per program
  {4, 8, 16, 32} (k's capped at its 4 heads) × num_warps {1, 2, 4, 8};
- the weighted combine (moeflow.ops.permute_triton._sum_rows): out[t] = Σ_k w·y[row[t, k]] over
  y_ND [T·8, 2048], row_TK a random permutation of the rows, all kept, fp32 weights; tokens
  {1, 2, 4, 8, 16} × columns {256, 512, 1024, 2048} × num_warps {2, 4, 8, 16}.
Skipped: tiles of more values per thread than MAX_VALUES_PER_THREAD (ptxas spills there) or
fewer values than threads.

Per tile: `copies` sets of inputs (together at least 4× the L2, so that a call does not find its
inputs in L2 from the last call of them), one CUDA graph of one call per copy, replayed REPS
times and timed with CUDA events; the figure is the median µs per call. GB/s = bytes read +
written / time, against a measured copy ceiling (bytes read + written / time of a large
device-to-device copy). Every tile's output on copy 0 must equal the default tile's
(torch.equal: a tile changes the speed, never the bits); the script exits with an error
otherwise, after writing its results. The BEST fastest tiles and the default are then timed at
T = 128 and 8192 too.

    PYTHONPATH=. python benchmarks/elementwise_sweep.py --out $OUT            # one H200
    PYTHONPATH=. python benchmarks/elementwise_sweep.py --smoke --out /tmp/e  # CPU, interpreter

writes OUT/elementwise_sweep.{json,md}. Triton first compiles the ~130 tiles in up to 8
processes into its on-disk cache (a second run finds them there), then times them: the whole
sweep took 30 s on an H200 (session 11). --smoke runs two tiles of each kernel on tiny fp32
shapes through Triton's interpreter on the CPU (timings meaningless: it only shows the script
runs and the tiles agree).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import triton_cpu  # noqa: E402, F401  (before triton: the interpreter without CUDA)
import triton  # noqa: E402
from decode_attention import copy_ceiling_gbps, time_per_call  # noqa: E402
from machine import (kernel_bench_heading, kernel_bench_parser, measure_shapes,  # noqa: E402
                     write_kernel_bench)

from moeflow.model.rope import rope_cos_sin  # noqa: E402
from moeflow.ops import permute_triton, qk_rope_triton  # noqa: E402


@dataclass(frozen=True)
class Shape:
    op: str  # "qk_norm_rope" or "combine"
    T: int  # tokens of the sweep
    other_T: tuple[int, ...]  # tokens the fastest tiles and the default are timed at too
    H: int = 32  # Qwen3-30B-A3B: query heads, kv heads, head dim
    G: int = 4
    hd: int = 128
    K: int = 8  # its top-k and d_model
    D: int = 2048


SHAPES = (Shape("qk_norm_rope", 2048, (128, 8192)), Shape("combine", 2048, (128, 8192)))
SMOKE_SHAPES = (Shape("qk_norm_rope", 5, (3,), H=3, G=1, hd=8),
                Shape("combine", 7, (3,), K=3, D=24))
REPS = 50
BEST = 3
# Beyond these fp32 values per thread, ptxas spills hundreds of bytes (sm_90, Triton 3.6; the
# combine keeps its K rows' loads in flight).
MAX_VALUES_PER_THREAD = {"qk_norm_rope": 128, "combine": 64}
MAX_COPIES = 256
KERNELS = {"qk_norm_rope": qk_rope_triton._launch, "combine": permute_triton._sum_rows}
TITLES = {"qk_norm_rope": "q/k norm + RoPE", "combine": "weighted combine"}
# The q/k kernel's first version: one token and 4 heads per program, 2 warps (its bits too).
FIRST_QK_TILE = {"block_t": 1, "block_h": 4, "num_warps": 2}


def default_tile(sh: Shape) -> dict:
    return dict(KERNELS[sh.op].__kwdefaults__)


def tiles(sh: Shape, smoke: bool) -> list[dict]:
    """The grid of tiles, less those of too many values per thread or fewer values than
    threads and those the launcher caps to another one of the grid (the default first)."""
    default = default_tile(sh)
    if smoke:
        other = ({"block_t": 2, "block_h": 2, "num_warps": 2} if sh.op == "qk_norm_rope" else
                 {"block_t": 8, "block_d": 16, "num_warps": 2})
        return [default, other]
    out, seen = [default], {tile_key(sh, default)}
    if sh.op == "qk_norm_rope":
        grid = [{"block_t": t, "block_h": h, "num_warps": w} for t in (1, 2, 4, 8, 16)
                for h in (4, 8, 16, 32) for w in (1, 2, 4, 8)]
    else:
        grid = [{"block_t": t, "block_d": d, "num_warps": w} for t in (1, 2, 4, 8, 16)
                for d in (256, 512, 1024, 2048) for w in (2, 4, 8, 16)]
    for tile in grid:
        values = tile_values(sh, tile)
        threads = 32 * tile["num_warps"]
        if (tile_key(sh, tile) in seen
                or not threads <= values <= MAX_VALUES_PER_THREAD[sh.op] * threads):
            continue
        seen.add(tile_key(sh, tile))
        out.append(tile)
    return out


def tile_key(sh: Shape, tile: dict) -> tuple:
    """The tile as the launcher runs it: heads capped per tensor, columns at D."""
    if sh.op == "qk_norm_rope":
        return (tile["block_t"], min(tile["block_h"], triton.next_power_of_2(sh.H)),
                min(tile["block_h"], triton.next_power_of_2(sh.G)), tile["num_warps"])
    return tile["block_t"], min(tile["block_d"], triton.next_power_of_2(sh.D)), tile["num_warps"]


def tile_values(sh: Shape, tile: dict) -> int:
    """Values in the largest tile of one program (q's, for the q/k kernel)."""
    if sh.op == "qk_norm_rope":
        return tile["block_t"] * min(tile["block_h"], triton.next_power_of_2(sh.H)) * sh.hd
    return tile["block_t"] * min(tile["block_d"], triton.next_power_of_2(sh.D))


def tile_name(sh: Shape, tile: dict) -> str:
    key = tile_key(sh, tile)
    if sh.op == "qk_norm_rope":
        return f"{key[0]} tok × {key[1]}/{key[2]} heads, {key[3]} warps"
    return f"{key[0]} tok × {key[1]} cols, {key[2]} warps"


def make_inputs(sh: Shape, T: int, dtype, device) -> tuple:
    """One set of the kernel's positional arguments at T tokens."""
    if sh.op == "qk_norm_rope":  # as moeflow.model.attention.Attention.forward passes them
        qkv = torch.randn(1, T, (sh.H + 2 * sh.G) * sh.hd, device=device, dtype=dtype)
        q, k, _ = qkv.split([sh.H * sh.hd, sh.G * sh.hd, sh.G * sh.hd], dim=-1)
        q_BHTd = q.view(1, T, sh.H, sh.hd).transpose(1, 2)
        k_BGTd = k.view(1, T, sh.G, sh.hd).transpose(1, 2)
        qw, kw = ((1 + 0.1 * torch.randn(sh.hd, device=device)).to(dtype) for _ in range(2))
        cos, sin = rope_cos_sin(torch.arange(T, device=device)[None], sh.hd, 1e6, dtype)
        return q_BHTd, k_BGTd, qw, kw, 1e-6, cos, sin, False
    N = T * sh.K
    y_ND = torch.randn(N, sh.D, device=device, dtype=dtype)
    row_TK = torch.randperm(N, device=device).view(T, sh.K)
    kept_i8 = torch.ones(T, sh.K, dtype=torch.bool, device=device).view(torch.int8)
    w_TK = torch.rand(T, sh.K, device=device)
    return y_ND, row_TK, kept_i8, w_TK, T, True


def input_bytes(sh: Shape, T: int, dtype) -> int:
    """Bytes one copy of the inputs takes (what must leave L2 between two calls on it)."""
    es = torch.finfo(dtype).bits // 8
    if sh.op == "qk_norm_rope":
        return T * (sh.H + 2 * sh.G) * sh.hd * es
    return T * sh.K * sh.D * es


def moved_bytes(sh: Shape, T: int, dtype) -> int:
    """Bytes a call reads and writes at least."""
    es = torch.finfo(dtype).bits // 8
    if sh.op == "qk_norm_rope":  # q and k in and out, cos and sin, the two norm weights
        return (2 * (sh.H + sh.G) * T * sh.hd + 2 * T * sh.hd + 2 * sh.hd) * es
    # the K rows of every token in, its sum out; row ids (int64), weights (fp32), kept (int8)
    return (T * sh.K * sh.D + T * sh.D) * es + T * sh.K * (8 + 4 + 1)


def run(sh: Shape, args: tuple, tile: dict) -> tuple[torch.Tensor, ...]:
    out = KERNELS[sh.op](*args, **tile)
    return out if isinstance(out, tuple) else (out,)


def measure_T(sh: Shape, T: int, picks: list[dict], dtype, device) -> list[dict]:
    """Rows of `picks` (the default first) at T tokens: µs per call, GB/s, same bits as the
    default."""
    torch.manual_seed(T)
    l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    copies = min(MAX_COPIES, max(2, math.ceil(4 * l2 / input_bytes(sh, T, dtype))))
    inputs = [make_inputs(sh, T, dtype, device) for _ in range(copies)]
    want = run(sh, inputs[0], picks[0])
    rows = []
    for tile in picks:
        got = run(sh, inputs[0], tile)  # compiles the tile, outside the graph
        same = all(torch.equal(a, b) for a, b in zip(got, want))
        del got

        def calls(tile=tile):
            for args in inputs:
                run(sh, args, tile)
        us = time_per_call(calls, copies, device, REPS)
        row = {"op": sh.op, "T": T, **tile, "tile": tile_name(sh, tile), "us": us,
               "gbps": moved_bytes(sh, T, dtype) / us / 1e3, "same_bits_as_default": same,
               "default": tile == picks[0], "copies": copies}
        rows.append(row)
        print(f"{sh.op} T={T} {row['tile']:<34} {us:8.2f} µs {row['gbps']:7.0f} GB/s"
              f"{'' if same else '  DIFFERENT BITS'}", flush=True)
    return rows


def precompile(sh: Shape, picks: list[dict], dtype, device) -> None:
    """Compile the tiles in parallel processes into Triton's on-disk cache, where the timing
    process then finds them (a compile takes 0.5-4 s of one core; the sweep has ~130)."""
    workers = min(8, os.cpu_count() or 1, len(picks))
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        pool.starmap(compile_tiles, [(sh, picks[i::workers], dtype, device.type)
                                     for i in range(workers)])


def compile_tiles(sh: Shape, picks: list[dict], dtype, device_type: str) -> None:
    """One call of each tile on inputs of the sweep's shape (the same specialisation)."""
    args = make_inputs(sh, sh.T, dtype, torch.device(device_type))
    with torch.no_grad():
        for tile in picks:
            run(sh, args, tile)
    if device_type == "cuda":
        torch.cuda.synchronize()


def measure(sh: Shape, dtype, device) -> list[dict]:
    """The sweep at sh.T, then the BEST fastest tiles and the default at sh.other_T."""
    picks = tiles(sh, device.type != "cuda")
    precompile(sh, picks, dtype, device)
    rows = measure_T(sh, sh.T, picks, dtype, device)
    fastest = [r for r in sorted(rows, key=lambda r: r["us"]) if not r["default"]][:BEST]
    picks = [default_tile(sh)] + [{k: r[k] for k in default_tile(sh)} for r in fastest]
    for T in sh.other_T:
        rows += measure_T(sh, T, picks, dtype, device)
    return rows


def sweep_table(rows: list[dict], sh: Shape, ceiling: float | None) -> str:
    swept = sorted((r for r in rows if r["op"] == sh.op and r["T"] == sh.T),
                   key=lambda r: r["us"])
    default_us = next(r["us"] for r in swept if r["default"])
    out = (f"\n## {TITLES[sh.op]}, T = {sh.T}: {len(swept)} tiles, default "
           f"{default_us:.2f} µs\n\n| # | tile | µs | GB/s | vs default | same bits |\n"
           "|---|---|---|---|---|---|\n")
    for i, r in enumerate(swept, 1):
        note = " (default)" if r["default"] else (
            " (first version's)" if sh.op == "qk_norm_rope"
            and all(r[k] == v for k, v in FIRST_QK_TILE.items()) else "")
        gbps = f"{r['gbps']:.0f}" + (f" ({r['gbps'] / ceiling:.0%})" if ceiling else "")
        out += (f"| {i} | {r['tile']}{note} | {r['us']:.2f} | {gbps} | "
                f"{default_us / r['us']:.2f}x | {'yes' if r['same_bits_as_default'] else 'NO'} |\n")
    return out


def tokens_table(rows: list[dict], sh: Shape) -> str:
    Ts = (sh.T,) + sh.other_T
    picked = [r["tile"] for r in rows if r["op"] == sh.op and r["T"] == sh.other_T[0]]
    out = (f"\n### {TITLES[sh.op]}: the default and the {BEST} fastest at other token counts "
           f"(µs, GB/s)\n\n| tile | " + " | ".join(f"T = {T}" for T in Ts) + " |\n"
           + "|---" * (len(Ts) + 1) + "|\n")
    for name in picked:
        cells = []
        for T in Ts:
            r = next(r for r in rows if r["op"] == sh.op and r["T"] == T and r["tile"] == name)
            cells.append(f"{r['us']:.2f} ({r['gbps']:.0f})"
                         + ("" if r["same_bits_as_default"] else " NOT SAME BITS"))
        out += f"| {name} | " + " | ".join(cells) + " |\n"
    return out


def main() -> None:
    args = kernel_bench_parser(__doc__).parse_args()
    rows, meta = measure_shapes(args.smoke, SHAPES, SMOKE_SHAPES, measure, REPS,
                                copy_ceiling_gbps)
    ceiling = meta["copy_ceiling_gbps"]
    timing = (f"µs / call: median of {REPS} replays of a graph of one call per input copy"
              if meta["device"] != "cpu" else
              "µs / call: one eager run (the kernels through the interpreter): meaningless")
    md = (kernel_bench_heading(meta, "Tiles of the q/k norm + RoPE and combine kernels")
          + f"; {timing}; GB/s of the bytes read + written, copy ceiling "
          f"{'-' if ceiling is None else f'{ceiling:.0f} GB/s'} (in brackets: its fraction); "
          "same bits = torch.equal to the default tile's output.\n")
    for sh in (SMOKE_SHAPES if args.smoke else SHAPES):
        md += sweep_table(rows, sh, ceiling) + tokens_table(rows, sh)
    write_kernel_bench(args.out, "elementwise_sweep", meta, rows, md)
    print(f"total {meta['seconds']:.1f} s")
    different = [r for r in rows if not r["same_bits_as_default"]]
    if different:
        raise SystemExit(f"moeflow: error: {len(different)} tiles wrote other bits than the "
                         f"default: {sorted({r['op'] + ' ' + r['tile'] for r in different})}")


if __name__ == "__main__":
    main()
