"""Persistent grouped expert MLP for many-token inference on Hopper: one program per SM walks
the (expert, column tile, row tile) list of the up GEMM, then of the down GEMM.

Why: at large prefill and batch sizes (hundreds of rows per expert) the expert GEMMs are most
of a MoE layer, and both paths before this one left time on the table there. torch._grouped_mm
(CUTLASS) needs its rows gathered into expert order first and the activation as a pass of its
own (at 16384 tokens of the Qwen3-30B-A3B shape: a 262 µs gather and a 135 µs activation around
~2 ms of GEMMs, benchmarks/results/moe_layer, session 25); the tiled kernels fuse both, but
launch one program per tile, so each tile pays its own pipeline fill and its store is not
overlapped with the next tile's loads.

How: `_up_kernel` gathers each row tile from the token matrix by pointer loads (`token_N`), as
the tiled kernel does, while the weight tiles come through TMA (`TensorDescriptor`s over the
[E·D, I] and [E·F, D] weights: expert e's k-th row is row e·D + k); the activation (SwiGLU's
gate and up columns in two accumulators, or GELU) is applied before the store of h, so neither
the gathered rows nor the pre-activation touch memory. `_down_kernel` reads h through TMA too.
Each program strides over the tile list by the number of programs (the SMs), in the tiled
kernels' order — expert, then column tile, then row tile — so the tiles in flight at once
cover a few experts and share their weight slabs and rows through L2. On sm_90 the tile loop
asks for warp specialisation (`tl.range(warp_specialize=True)`), but Triton 3.6 compiles these
loops to the same PTX with or without it (session 47, compiled for sm_90): each tile runs one
software-pipelined loop over K, all warps issuing its loads (one thread) and its wgmma, and
the next tile's first loads are issued after this tile's epilogue, so neither that load
latency nor the epilogue overlaps the MMAs. With FLATTEN (the down kernel's configs for short
sums) the tile and K loops are one loop (`tl.range(flatten=True)`), which the pipeliner runs
across tile boundaries: the next tile's first stages load during this tile's last MMAs and
epilogue.

Rows the tile list reads past an expert's end (the last row tile of each expert) belong to the
next expert or lie past the last row: they are loaded, computed and never stored. Rows past
ends_E[-1] (parked rows) are left unwritten, as the other inference kernels leave them.

Measured (one H200, benchmarks/prefill_experts.py, five calls back to back): session 25, 0.90-
0.96x the time of gather + torch._grouped_mm + activation + torch._grouped_mm at 256-1024 rows
per expert of the Qwen3-30B-A3B shape and 512 of Mixtral-8x7B's; slower than it at 1024-2048 rows
of experts 2048 wide or more. Session 26, with the tiles below chosen per activation, width and
rows: 0.82-0.86x the tiled kernels at 128-256 rows per expert of Mixtral-8x7B, 0.98x at 128 of
Qwen3-30B-A3B; GELU experts on their 128 x 256 tiles tied the tiled kernels in the
ds-1.3b+moe128 layer at 16384 tokens (2.84-2.87 against 2.87-3.48 ms,
benchmarks/moe_layer_variants.py); the tiled kernels still win at 64 rows per expert and fewer
(the rule is moeflow.ops.backend's; benchmarks/results/prefill_experts/README.md). With
K tiles of 64 the sums run in the tiled kernels' order: at 2048 tokens the engine's first-token
logits were bit for bit the tiled path's (benchmarks/results/prefill, session 25).

Legend: N expert-sorted rows, D model dim, F expert ffn dim, I = F (GELU) or 2F (SwiGLU), E experts.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moeflow.ops.grid import next_power_of_2
from moeflow.ops.grouped_mlp_triton import activated, store_activated
from moeflow.ops.tiled_mlp_triton import list_tile, tile_list


@functools.cache
def _device_launch(index: int) -> tuple[int, bool]:
    """(programs, ws) on CUDA device `index`: one program per SM; ws on sm_90, where the
    configs below were measured (it also asks Triton for warp specialisation, which Triton 3.6
    does not apply to these loops: see the module's docstring). Raises on GPUs without TMA."""
    props = torch.cuda.get_device_properties(index)
    if props.major < 9:
        raise ValueError("persistent experts load through TMA: they need a Hopper (sm_90) or "
                         f"later GPU, not {props.name}")
    return props.multi_processor_count, (props.major, props.minor) == (9, 0)


# One launch config per kernel and GPU kind; no autotuning: a config with a pre-hook (the
# descriptors' block shapes) re-times in every process and cost ~0.1 ms of host per call
# (session 25). On sm_90 (ws), from the H200 sweeps of sessions 25-26
# (benchmarks/results/prefill_experts):
# - the SwiGLU up kernel on 64-row tiles with 256 columns of each half (its rows are gathered
#   by pointer loads, so a shorter row tile with wider columns loads fewer of them per weight
#   byte): 0.85 against 0.98-1.08 ms on Mixtral-8x7B's 256 rows per expert, 0.30 against 0.33
#   on Qwen3-30B-A3B's 128; the GELU up kernel (one accumulator) on 128 x 256 tiles, the same
#   registers;
# - the down kernel on 128-row tiles for short sums (F at most DOWN_SHORT_K_MAX: a tile's few
#   K steps amortise its start and store over more rows), on 64-row tiles for long ones (fewer
#   padded rows; Mixtral-8x7B's F 14336: 0.45 against 0.47-0.53 ms at 256 rows per expert);
# - above LONG_EXPERT_ROWS rows per expert (session 31: benchmarks/persistent_configs.py on
#   one machine, the layer on another; benchmarks/results/prefill_experts): whole row tiles
#   stored through TMA (STORE_SPLIT; the expert's last, partial tile by pointers), the up
#   kernel on session 25's 128 x 128 tiles in two 64-column pieces, the down kernel on
#   128 x 256 in one, each on 3 stages (the staged output tile takes the fourth's shared
#   memory). Qwen3-30B-A3B at 16384 tokens (1024 rows): up 1.675 -> 1.587 ms, down 0.872 ->
#   0.801; the MoE layer's forward 2.486-2.529 -> 2.315-2.358 on one machine (2.315-2.541 over
#   six runs on three). At 128-512 rows the same stores were within +-2% on Qwen3 and 4-10%
#   slower on Mixtral's 256 rows.
# - for short sums the down kernel's tile and K loops flattened (FLATTEN; session 49, H100,
#   benchmarks/results/prefill_experts and moe_layer): a tile of Qwen3-30B-A3B's F 768 is 12 K
#   steps, whose pipeline fill and epilogue the flattened loop overlaps with the tiles around
#   it. The kernel alone at 4096 / 8192 tokens 0.270-0.277 -> 0.239-0.251 / 0.476-0.547 ->
#   0.435-0.442 ms, the MoE layer's forward at 4096 replayed from a graph 0.793-0.817 ->
#   0.767-0.785. Flattening the up kernel lost (its 32-step tiles gain little and fit fewer
#   stages: session 48).
# Elsewhere (unmeasured GPUs): session 25's 128-row configs.
LONG_EXPERT_ROWS = 512
DOWN_SHORT_K_MAX = 2048
_WIDE = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64}


def _configs(ws: bool, F: int, rows_per_expert: float, swiglu: bool
             ) -> tuple[dict, dict, dict, dict]:
    """(up blocks, up launch, down blocks, down launch) on sm_90 (ws) or another GPU, for
    experts F wide averaging `rows_per_expert` rows."""
    if not ws:
        return (_WIDE, {"num_warps": 8, "num_stages": 4},
                {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64}, {"num_warps": 8, "num_stages": 3})
    launch = {"num_warps": 8, "num_stages": 3}
    if rows_per_expert > LONG_EXPERT_ROWS:
        return (dict(_WIDE, STORE_SPLIT=2), launch,
                {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "STORE_SPLIT": 1}, launch)
    up = {"BLOCK_M": 64 if swiglu else 128, "BLOCK_N": 256, "BLOCK_K": 64}
    down = {"BLOCK_M": 64 if F > DOWN_SHORT_K_MAX else 128, "BLOCK_N": 256, "BLOCK_K": 64,
            "FLATTEN": F <= DOWN_SHORT_K_MAX}
    return up, launch, down, {"num_warps": 8, "num_stages": 4}


# Triton's interpreter (CPU tests): small tiles, a few programs, no specialisation.
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 16}


@triton.jit
def _up_kernel(x_ptr, token_ptr, ends_ptr, w_desc, b_ptr, h_ptr, h_desc, D, F, E,
               SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
               BLOCK_E: tl.constexpr, NUM_PROGRAMS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, WS: tl.constexpr,
               STORE_SPLIT: tl.constexpr = 0):
    n_cols = tl.cdiv(F, BLOCK_N)
    ee, lo_e, hi_e, tiles_e, cum, total = tile_list(ends_ptr, E, n_cols, BLOCK_E, BLOCK_M)
    I = 2 * F if SWIGLU else F
    for t in tl.range(tl.program_id(0), total, NUM_PROGRAMS, warp_specialize=WS):
        e, m0, hi, col = list_tile(ee, lo_e, hi_e, tiles_e, cum, t, n_cols, BLOCK_M)
        n0 = col * BLOCK_N
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < hi
        if GATHER:
            src = tl.load(token_ptr + rows, mask=rmask, other=0).to(tl.int64)
        else:
            src = rows.to(tl.int64)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + src[:, None] * D + k[None, :],
                        mask=rmask[:, None] & (k < D)[None, :], other=0.0)
            acc_g = tl.dot(a, w_desc.load([e * D + k0, n0]), acc_g)
            if SWIGLU:
                acc_u = tl.dot(a, w_desc.load([e * D + k0, F + n0]), acc_u)
        n = n0 + tl.arange(0, BLOCK_N)
        if STORE_SPLIT > 0 and m0 + BLOCK_M <= hi:  # a whole row tile (constexpr first)
            _store_tile(h_desc, m0, n0, activated(acc_g, acc_u, b_ptr + e * I, n, n < F, F,
                                                  SWIGLU, HAS_BIAS).to(h_desc.dtype),
                        BLOCK_M, BLOCK_N, STORE_SPLIT)
        else:
            store_activated(acc_g, acc_u, b_ptr + e * I, h_ptr, rows, rmask, n, n < F, F,
                            SWIGLU, HAS_BIAS)


@triton.jit
def _down_kernel(h_desc, ends_ptr, w_desc, b_ptr, y_ptr, y_desc, D, F, E,
                 HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, NUM_PROGRAMS: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 WS: tl.constexpr, STORE_SPLIT: tl.constexpr = 0,
                 FLATTEN: tl.constexpr = False):
    n_cols = tl.cdiv(D, BLOCK_N)
    ee, lo_e, hi_e, tiles_e, cum, total = tile_list(ends_ptr, E, n_cols, BLOCK_E, BLOCK_M)
    for t in tl.range(tl.program_id(0), total, NUM_PROGRAMS, warp_specialize=WS,
                        flatten=FLATTEN):
        e, m0, hi, col = list_tile(ee, lo_e, hi_e, tiles_e, cum, t, n_cols, BLOCK_M)
        n0 = col * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        # h's columns past F are zeros (TMA fills out-of-bounds), so the weight rows read past
        # expert e's last (the next expert's first rows) add nothing.
        for k0 in range(0, F, BLOCK_K):
            acc = tl.dot(h_desc.load([m0, k0]), w_desc.load([e * F + k0, n0]), acc)
        rows = m0 + tl.arange(0, BLOCK_M)
        n = n0 + tl.arange(0, BLOCK_N)
        nmask = n < D
        if HAS_BIAS:
            acc += tl.load(b_ptr + e * D + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        y = acc.to(y_ptr.dtype.element_ty)
        if STORE_SPLIT > 0 and m0 + BLOCK_M <= hi:  # a whole row tile (constexpr first)
            _store_tile(y_desc, m0, n0, y, BLOCK_M, BLOCK_N, STORE_SPLIT)
        else:
            tl.store(y_ptr + rows[:, None].to(tl.int64) * D + n[None, :], y,
                     mask=(rows < hi)[:, None] & nmask[None, :])


@triton.jit
def _store_tile(desc, m0, n0, y, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                SPLIT: tl.constexpr):
    """A whole [BLOCK_M, BLOCK_N] tile through TMA at (m0, n0), in SPLIT (1 or 2) column pieces
    (desc's block: [BLOCK_M, BLOCK_N // SPLIT]; columns past the tensor's are clipped)."""
    if SPLIT == 1:
        desc.store([m0, n0], y)
    else:
        tl.static_assert(SPLIT == 2, "a whole tile is stored in one or two column pieces")
        halves = tl.permute(tl.reshape(y, [BLOCK_M, 2, BLOCK_N // 2]), (0, 2, 1))
        y0, y1 = tl.split(halves)
        desc.store([m0, n0], y0)
        desc.store([m0, n0 + BLOCK_N // 2], y1)


def expert_mlp_persistent(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                          b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                          b_out_ED: torch.Tensor | None, activation: str,
                          parked: bool = True, rows_N: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """Many-token inference (no autograd): the persistent up and down kernels. `rows_N`: x_ND
    holds the tokens and row n is x_ND[rows_N[n]], gathered by the up kernel. Rows past
    ends_E[-1] are left unwritten (combine never reads them), whatever `parked` says."""
    N, D = x_ND.shape if rows_N is None else (rows_N.shape[0], x_ND.shape[1])
    E, F = w_out_EFD.shape[0], w_out_EFD.shape[1]
    x_ND, ends = x_ND.contiguous(), ends_E.contiguous()
    h_NF = torch.empty(N, F, dtype=x_ND.dtype, device=x_ND.device)
    y_ND = torch.empty(N, D, dtype=x_ND.dtype, device=x_ND.device)
    if N == 0:
        return y_ND
    if x_ND.is_cuda:
        index = x_ND.device.index if x_ND.device.index is not None else \
            torch.cuda.current_device()
        programs, ws = _device_launch(index)
        up_blocks, up_launch, down_blocks, down_launch = _configs(
            ws, F, N / E, activation == "swiglu")
    else:  # Triton's interpreter
        programs, ws = 3, False
        up_blocks = down_blocks = _INTERPRETER_BLOCKS
        up_launch = down_launch = {}
    launch_up(x_ND, rows_N, ends, w_in_EDI, b_in_EI, h_NF, activation == "swiglu", programs, ws,
              up_blocks, up_launch)
    launch_down(h_NF, ends, w_out_EFD, b_out_ED, y_ND, programs, ws, down_blocks, down_launch)
    return y_ND


def launch_up(x: torch.Tensor, rows_N: torch.Tensor | None, ends_E: torch.Tensor,
              w_in_EDI: torch.Tensor, b_in_EI: torch.Tensor | None, h_NF: torch.Tensor,
              swiglu: bool, programs: int, ws: bool, blocks: dict, launch: dict) -> None:
    """The up kernel into h_NF under one config (blocks: BLOCK_M/N/K; launch: warps, stages):
    x holds the tokens when rows_N is given (gathered), else the expert-sorted rows. The
    tile-config benchmarks call it directly (benchmarks/persistent_configs.py)."""
    E, D, I = w_in_EDI.shape
    w_in = w_in_EDI.contiguous().view(E * D, I)
    w_desc = TensorDescriptor.from_tensor(w_in, [blocks["BLOCK_K"], blocks["BLOCK_N"]])
    _up_kernel[(programs,)](x, rows_N if rows_N is not None else ends_E, ends_E, w_desc,
                            b_in_EI if b_in_EI is not None else w_in, h_NF,
                            _store_desc(h_NF, blocks, w_desc), D, h_NF.shape[1],
                            E, SWIGLU=swiglu, HAS_BIAS=b_in_EI is not None,
                            GATHER=rows_N is not None, BLOCK_E=next_power_of_2(E),
                            NUM_PROGRAMS=programs, WS=ws, **blocks, **launch)


def launch_down(h_NF: torch.Tensor, ends_E: torch.Tensor, w_out_EFD: torch.Tensor,
                b_out_ED: torch.Tensor | None, y_ND: torch.Tensor, programs: int, ws: bool,
                blocks: dict, launch: dict) -> None:
    """The down kernel from h_NF into y_ND under one config (as launch_up)."""
    E, F, D = w_out_EFD.shape
    w_out = w_out_EFD.contiguous().view(E * F, D)
    h_desc = TensorDescriptor.from_tensor(h_NF, [blocks["BLOCK_M"], blocks["BLOCK_K"]])
    w_desc = TensorDescriptor.from_tensor(w_out, [blocks["BLOCK_K"], blocks["BLOCK_N"]])
    _down_kernel[(programs,)](h_desc, ends_E, w_desc, b_out_ED if b_out_ED is not None else w_out,
                              y_ND, _store_desc(y_ND, blocks, w_desc), D, F, E,
                              HAS_BIAS=b_out_ED is not None,
                              BLOCK_E=next_power_of_2(E), NUM_PROGRAMS=programs, WS=ws,
                              **blocks, **launch)


def _store_desc(out: torch.Tensor, blocks: dict, unused: TensorDescriptor) -> TensorDescriptor:
    """The output's TMA descriptor for blocks' STORE_SPLIT > 0 (whole row tiles stored in that
    many column pieces), else `unused` in its place (the kernel never touches it)."""
    split = blocks.get("STORE_SPLIT", 0)
    if not split:
        return unused
    return TensorDescriptor.from_tensor(out, [blocks["BLOCK_M"], blocks["BLOCK_N"] // split])
