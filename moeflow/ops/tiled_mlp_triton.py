"""Grouped expert MLP on CUDA for prefill-sized inference: a tiled Triton grouped GEMM.

Tens to ~128 rows per expert: `expert_mlp_tiled`, a grouped GEMM on tensor-core tiles. One
program per (expert, column tile, row tile), in that order of launch (`_expert_tile` finds a
program's expert, row tile and column tile from ends_E): an expert's row tiles of one column
tile run side by side and read its weight slab once through L2, and a wave of programs covers
all column tiles of a few experts, which share their rows. At these sizes the layer is bound by
reading every expert's weights (Qwen3-30B-A3B, 2048 tokens: 1.2 GB per layer), so that order
matters more than the MMA rate. The up kernel gathers its rows (`token_N`) and applies the
activation before storing, as the stream kernel does; the row-tile bodies are the stream
kernels' too (moeflow.ops.grouped_mlp_triton's `up_rows`, `down_rows`).

Legend: N expert-sorted rows, D model dim, F expert ffn dim, I = F (GELU) or 2F (SwiGLU), E experts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import cdiv
from moeflow.ops.grouped_mlp_triton import UpDown, down_rows, expert_buffers, run_up_down, up_rows
from moeflow.ops.pdl import launch_next, wait_for_previous


@triton.jit
def _expert_tile(ends_ptr, pid, E, n_tiles, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """(e, m0, hi, j): program `pid`'s expert, first row, the expert's row end and column tile.
    Programs run expert by expert, within one expert column tile by column tile, within a
    column tile row tile by row tile: the row tiles of a column tile (neighbours in launch
    order, so resident together) share its weight slab through L2, and one wave of programs
    covers all column tiles of a few experts, which share their rows. m0 >= hi: past the last
    tile, no work (the grid is sized for the most tiles any routing can need)."""
    ee, lo_e, hi_e, tiles_e, cum, _ = tile_list(ends_ptr, E, n_tiles, BLOCK_E, BLOCK_M)
    return list_tile(ee, lo_e, hi_e, tiles_e, cum, pid, n_tiles, BLOCK_M)


@triton.jit
def tile_list(ends_ptr, E, n_cols, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr):
    """The (expert, column tile, row tile) list of a grouped GEMM over ends_E: per expert its
    row range and row tiles, the list's running tile count, and its length."""
    ee = tl.arange(0, BLOCK_E)
    emask = ee < E
    hi_e = tl.load(ends_ptr + ee, mask=emask, other=0).to(tl.int32)
    lo_e = tl.load(ends_ptr + ee - 1, mask=emask & (ee > 0), other=0).to(tl.int32)
    tiles_e = tl.where(emask, (hi_e - lo_e + BLOCK_M - 1) // BLOCK_M, 0)
    cum = tl.cumsum(tiles_e * n_cols, axis=0)
    return ee, lo_e, hi_e, tiles_e, cum, tl.sum(tiles_e, axis=0) * n_cols


@triton.jit
def list_tile(ee, lo_e, hi_e, tiles_e, cum, t, n_cols, BLOCK_M: tl.constexpr):
    """Tile t of tile_list's list: its expert, first row, the expert's row end, column tile."""
    e = tl.sum((cum <= t).to(tl.int32), axis=0)
    hit = ee == e
    first = tl.sum(tl.where(hit, cum - tiles_e * n_cols, 0), axis=0)
    tiles = tl.maximum(tl.sum(tl.where(hit, tiles_e, 0), axis=0), 1)
    lo = tl.sum(tl.where(hit, lo_e, 0), axis=0)
    hi = tl.sum(tl.where(hit, hi_e, 0), axis=0)
    r = t - first
    return e, lo + (r % tiles) * BLOCK_M, hi, r // tiles


def _tiled_configs(accumulators: int):
    # Tensor-core tiles for prefill (tens to hundreds of rows per expert): 64- and 128-row
    # tiles (one or two warpgroups), 2-4 stages of loads in flight; at most 128 fp32
    # accumulator registers per thread (the up kernel holds two tiles for SwiGLU).
    tiles = ((64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 64, 64, 8, 4), (128, 128, 64, 8, 3),
             (64, 128, 64, 8, 4), (128, 128, 32, 8, 4), (64, 256, 64, 8, 3),
             (128, 256, 64, 8, 3))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                          num_stages=s)
            for bm, bn, bk, w, s in tiles if accumulators * bm * bn <= 128 * 32 * w]


@triton.autotune(configs=_tiled_configs(accumulators=2),
                 key=["D", "F", "E", "M_BUCKET", "A_BUCKET", "SWIGLU"], reset_to_zero=[],
                 cache_results=True)
@triton.jit
def _up_tiled_kernel(x_ptr, token_ptr, ends_ptr, w_ptr, b_ptr, h_ptr, D, F, E, M_BUCKET, A_BUCKET,
                     SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
                     BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    launch_next(PDL)
    e, m0, hi, pid_n = _expert_tile(ends_ptr, tl.program_id(0), E, tl.cdiv(F, BLOCK_N),
                                    BLOCK_E, BLOCK_M)
    if m0 >= hi:
        return
    I = 2 * F if SWIGLU else F
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    up_rows(x_ptr, token_ptr, w_ptr + e.to(tl.int64) * D * I, b_ptr + e * I, h_ptr, m0, hi, n,
            n < F, D, F, SWIGLU, HAS_BIAS, GATHER, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.autotune(configs=_tiled_configs(accumulators=1),
                 key=["D", "F", "E", "M_BUCKET", "A_BUCKET"], reset_to_zero=[],
                 cache_results=True)
@triton.jit
def _down_tiled_kernel(h_ptr, ends_ptr, w_ptr, b_ptr, y_ptr, D, F, E, M_BUCKET, A_BUCKET,
                       HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    launch_next(PDL)
    e, m0, hi, pid_n = _expert_tile(ends_ptr, tl.program_id(0), E, tl.cdiv(D, BLOCK_N),
                                    BLOCK_E, BLOCK_M)
    if m0 >= hi:
        return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    down_rows(h_ptr, w_ptr + e.to(tl.int64) * F * D, b_ptr + e * D, y_ptr, m0, hi, n, n < D, D,
              F, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K)


def _tiled_grid(N: int, E: int, cols: int):
    """Programs for the most (row tile, column tile) pairs any routing of N rows can need: each
    expert with rows wastes less than one row tile."""
    return lambda meta: ((cdiv(N, meta["BLOCK_M"]) + min(N, E))
                         * cdiv(cols, meta["BLOCK_N"]),)


def expert_mlp_tiled(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                     b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                     b_out_ED: torch.Tensor | None, activation: str,
                     parked: bool = True, rows_N: torch.Tensor | None = None) -> torch.Tensor:
    """Many-token path for inference (no autograd): a grouped GEMM in Triton over (expert, row
    tile, column tile) programs. The up kernel gathers its rows (`rows_N`) as it loads them and
    applies the activation before it stores, so neither the gathered rows nor the [N, 2F]
    pre-activation touch memory; the down kernel writes y. Rows past ends_E[-1] are left
    unwritten, as in expert_mlp_stream."""
    buf = expert_buffers(x_ND, ends_E, w_in_EDI, w_out_EFD, rows_N)
    N, F = buf.h_NF.shape
    if N == 0:
        return buf.y_ND
    D, E = buf.y_ND.shape[1], buf.w_out_EFD.shape[0]
    kernels = UpDown(_up_tiled_kernel, _down_tiled_kernel, _tiled_grid(N, E, F),
                     _tiled_grid(N, E, D), {}, {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})
    return run_up_down(kernels, buf, b_in_EI, b_out_ED, activation, rows_N)
