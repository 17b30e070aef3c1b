"""A dense projection of a few rows (decode) as one weight-streaming Triton kernel:
`linear_stream(x, weight, bias)` = F.linear(x, weight, bias) for at most 16 rows of x, forward
only. moeflow.ops.backend.resolve_linear_backend chooses it (Backends.matmul "stream", and
"auto" for inference calls of bf16/fp16 on CUDA); moeflow.model.linear
runs it.

Measured on the H200 (benchmarks/results/skinny_linear, 2026-12-02): 46–76% of the copy rate,
faster than cuBLAS on the output projections (Qwen3-30B-A3B 4096 → 2048: 8.2–8.6 vs 9.5 µs at
1–16 rows) and slower or equal on the wider qkv projections (2048 → 5120: 9.1 vs 8.1 µs); the
~3.5 TB/s this design was expected to reach (below) was not.

Why: at decode a projection multiplies one row (or a few) by its whole weight, so its time is the
weight's bytes over the memory bandwidth. Measured on the H200 by the profile of 2026-12-02 (a
batch-1 decode step of the Qwen3-30B-A3B shape), cuBLAS ran the attention's qkv projection
(x [1, 2048] · W [5120, 2048]ᵀ, 21 MB of bf16 weight) in 7.8 µs and the output projection
(x [1, 4096] · W [2048, 4096]ᵀ, 16.8 MB) as a split-K GEMV of 7.2 µs plus a 1.7 µs reduce kernel:
2.0–2.7 TB/s, where the GPU copies at ~4.2 TB/s and the expert stream kernels
(moeflow.ops.grouped_mlp_triton) read their weights at 3.3–4.4 TB/s.

How: one program per tile of BLOCK_N outputs streams that tile's [BLOCK_N, K] slab of W once, in
BLOCK_K chunks, and multiplies each chunk with the matching columns of all rows of x. The rows are
padded to one 16-row tile (masked loads: the padding reads nothing) and multiplied with tl.dot,
at M = 1 too, because Triton software-pipelines the loads that feed a dot (num_stages chunks in
flight through shared memory), which is what keeps enough of the weight in flight to approach
the bandwidth; it is the pattern the expert stream kernels were measured with. The padded MMA
does 16× the useful math, still far from the compute bound (16 FLOP per weight byte, where the
H200 balances near 200). A multiply-and-sum in registers would do only the useful math, but
whether Triton pipelines its loads as deeply is up to the compiler's heuristics, not measured.
Sums are fp32; the bias is added in fp32 and the result rounded once, to x's dtype.

The kernel also has a swapped orientation (SWAP): the weight tile [64, BLOCK_K] is
the dot's M and the rows its N (yᵀ = W · xᵀ), so that Hopper's warpgroup MMA, which takes M in
64s, can run it. benchmarks/skinny16_probe.py (H200, session 17) put that first on the wide qkv
projection at 4 and 16 rows (8.05 / 8.18 µs, cuBLAS 8.25 / 8.51, unswapped 8.68 / 8.80), so
"auto" now streams wide weights too. The same probe split K over 2-8 programs per output tile
(fp32 partials summed by the last, in split order): 7.5 against 8.1 µs on the output
projection at 16 rows, ~0.5 µs, not taken (it needs a ticket counter per tile kept across
calls); issuing all loads before the first dot (as the register GEMV does) was slower.

Not split along K: more programs did not help in the decode graph (the output projection ran
faster on 32-wide tiles, 64 programs, than on 16-wide ones, 128 programs; linear_config), and a
split costs either a second launch to sum fp32 partials (the 1.7-2.1 µs cuBLAS spends on the
output projection) or atomics whose order changes the sums; a split-K
variant of the expert kernels lost on the H200 (benchmarks/NOTES-kernels.md).
benchmarks/skinny_linear.py shows each shape against the copy ceiling: a shape far below it is
where a split would be tried. The launch configuration is fixed per weight shape
(linear_config: measured in the decode graph, where the tiles that autotuning the kernel
alone picked took 12.3 µs against 8.0 and 9.3 for the fixed ones).

One row (a batch-1 decode step) runs a second kernel, `_gemv_kernel`: no MMA, every program
loads its [BLOCK_N, K] slab of W straight into registers in BLOCK_K chunks (unrolled, so all of
a program's loads are issued before the first multiply waits), multiplies by x in fp32 and sums
along K at the end. Measured on the H200 (benchmarks/results/skinny_linear, 2026-12-03): Qwen3-
30B-A3B output projection 5.96 µs (the MMA kernel 8.20, cuBLAS 9.33), qkv 6.88 (cuBLAS 8.38):
2.8-3.05 TB/s, so at one row "auto" takes it for every weight shape, wide ones included. The
same register design lost to the MMA stream kernels on the expert GEMVs (up 17.7 against 15.2
µs), which keep theirs (moeflow.ops.grouped_mlp_triton). Its launch configuration is fixed per
weight shape too (gemv_config), chosen in the decode graph for the same reason.

`warm_l2` (the attention's output projection in a decode step): the decode attention ahead lets
this kernel in right after its own wait (moeflow.ops.pdl) and then runs ~5 µs of dependent
loads with HBM nearly idle, so the first PREFETCH_PROGRAMS programs to become resident each
prefetch a share of the weight to L2 before they wait, and the kernel reads it from L2. Measured
in the served batch-1 graph of Qwen3-30B-A3B (H200, session 33, benchmarks/results/
decode_served): output projection end step 5.2 -> 4.75 µs, and with the attention and norm
letting their projections in at once, the layer 49.2 -> 48.2-48.4 µs (graph replay 2.522-2.525
-> 2.483-2.488 ms), batch 16 10.34 -> 10.29 ms. The qkv projection warmed the same way during the
norm ahead of it (~2 µs, too short to stream its 21 MB) lost: the norm's end step grew by ~1 µs
for ~0.1 µs gained. Without the early launch a prefetch only competes with the kernel's own
loads (qkv 6.6 -> 7.7 µs).

Legend: M rows of x (tokens), K input features, N output features (rows of W).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from moeflow.ops.backend import records_grad
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.pdl import launch_next, pdl_launch, prefetch_l2, prefetchable, wait_for_previous

# x's rows are padded to one tile of this many: the most one call takes.
MAX_ROWS = 16
# Triton's interpreter (CPU tests) runs these blocks.
INTERPRETER_BLOCKS = {"BLOCK_N": 16, "BLOCK_K": 32, "SWAP": False}
GEMV_INTERPRETER_BLOCKS = {"BLOCK_N": 4, "BLOCK_K": 32}
# With warm_l2, this many programs (the first resident) each prefetch a share of the weight.
PREFETCH_PROGRAMS = 128


def linear_config(N: int, K: int) -> dict:
    """The MMA kernel's launch configuration for a weight [N, K] (2-16 rows; fixed, not
    autotuned). Chosen inside the decode graph, where it runs: on the H200 (session 24,
    benchmarks/results/decode_timeline, Qwen3-30B-A3B at 16 rows, each config pinned for every
    projection, the kernel's end minus the previous kernel's end) the qkv projection (N > K)
    took 8.0 µs with the swapped 64 × 128 tiles against 8.6-12.8 for the others, and the
    output projection (N < K) 9.3 µs with 32 × 256 tiles against 10.7-12.2 (cuBLAS's split-K
    GEMM + reduce: 8.2 and 9.8-10.0). Autotuned alone, the kernel had picked 16-wide tiles on
    some machines, 12.3 µs in the graph on both projections: timing one kernel by itself did
    not rank the configs as the graph does. The rows do not change the tiles (one 16-row tile),
    so the choice holds from 2 rows."""
    if N > K:
        return {"BLOCK_N": 64, "BLOCK_K": 128, "SWAP": True, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_N": 32, "BLOCK_K": 256, "SWAP": False, "num_warps": 4, "num_stages": 4}


@triton.jit
def _linear_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_xk,
                   stride_wn, stride_wk, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   SWAP: tl.constexpr, PREFETCH_ROWS: tl.constexpr, PDL: tl.constexpr):
    _warm_l2(w_ptr, N, K, stride_wn, PREFETCH_ROWS)
    wait_for_previous(PDL)
    m = tl.arange(0, BLOCK_M)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask, nmask = m < M, n < N
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    if SWAP:
        acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        w_NK = tl.load(w_rows + k[None, :] * stride_wk, mask=nmask[:, None] & kmask[None, :],
                       other=0.0)
        if SWAP:  # yᵀ = W · xᵀ
            x_KM = tl.load(x_ptr + m[None, :] * stride_xm + k[:, None] * stride_xk,
                           mask=mmask[None, :] & kmask[:, None], other=0.0)
            acc = tl.dot(w_NK, x_KM, acc, input_precision=DOT_PRECISION)
        else:
            x_MK = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :] * stride_xk,
                           mask=mmask[:, None] & kmask[None, :], other=0.0)
            acc = tl.dot(x_MK, tl.trans(w_NK), acc, input_precision=DOT_PRECISION)
    launch_next(PDL)
    if SWAP:
        acc_MN = tl.trans(acc)
    else:
        acc_MN = acc
    if HAS_BIAS:
        acc_MN += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc_MN.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def gemv_config(N: int, K: int) -> dict:
    """The one-row GEMV's launch configuration for a weight [N, K] (fixed, not autotuned; each
    thread holds BLOCK_N · BLOCK_K / (32 · num_warps) fp32 partial sums). Chosen inside the
    served batch-1 decode graph (H200, session 27, benchmarks/results/decode_timeline: 31
    configs pinned, two passes, the kernel's end step and the next kernel's): wide weights
    (the qkv projection, N > K) take 2-row slabs in 1024-column chunks on 4 warps, 6.45 µs and
    the attention after it 6.47, against 7.39 + 7.12 with the 1-row slabs that autotuning the
    kernel alone picked on two machines (its 5120 programs keep the attention's programs from
    starting early under PDL); narrow ones (the output projection) 1-row slabs of 2048 columns
    on 8 warps, 5.25 µs (autotuning had picked 2-row slabs on one machine: 5.96)."""
    if N > K:
        config = {"BLOCK_N": 2, "BLOCK_K": 1024, "num_warps": 4}
    else:
        config = {"BLOCK_N": 1, "BLOCK_K": 2048, "num_warps": 8}
    return dict(config, BLOCK_K=min(config["BLOCK_K"], next_power_of_2(K)))


@triton.jit
def _warm_l2(w_ptr, N, K, stride_wn, PREFETCH_ROWS: tl.constexpr):
    """Before the PDL wait (warm_l2): program p < N / PREFETCH_ROWS prefetches rows
    p · PREFETCH_ROWS ... of the contiguous weight to L2, so the first programs resident warm
    all of it (none when PREFETCH_ROWS is 0)."""
    if PREFETCH_ROWS > 0:
        r0 = tl.program_id(0) * PREFETCH_ROWS
        if r0 < N:
            prefetch_l2(w_ptr + r0.to(tl.int64) * stride_wn,
                        tl.minimum(PREFETCH_ROWS, N - r0) * K)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, stride_xk, stride_wn, stride_wk,
                 K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, PREFETCH_ROWS: tl.constexpr, PDL: tl.constexpr):
    _warm_l2(w_ptr, N, K, stride_wn, PREFETCH_ROWS)
    wait_for_previous(PDL)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < N
    w_rows = w_ptr + n[:, None].to(tl.int64) * stride_wn
    acc_NK = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.static_range(0, K, BLOCK_K):  # unrolled: K is a compile-time constant
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        x_K = tl.load(x_ptr + k * stride_xk, mask=kmask, other=0.0).to(tl.float32)
        w_NK = tl.load(w_rows + k[None, :] * stride_wk, mask=nmask[:, None] & kmask[None, :],
                       other=0.0)
        acc_NK += w_NK.to(tl.float32) * x_K[None, :]
    launch_next(PDL)
    y_N = tl.sum(acc_NK, axis=1)
    if HAS_BIAS:
        y_N += tl.load(b_ptr + n, mask=nmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + n, y_N.to(y_ptr.dtype.element_ty), mask=nmask)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: int) -> None:
    """One-line ValueErrors for the calls the kernel does not take."""
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(f"linear_stream: weight {tuple(weight.shape)} does not match x "
                         f"{tuple(x.shape)}: it must be [N, {x.shape[-1]}]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"linear_stream: bias {tuple(bias.shape)} must be "
                         f"[{weight.shape[0]}]")
    if rows > MAX_ROWS:
        raise ValueError(f"linear_stream: x has {rows} rows, more than the {MAX_ROWS} it takes; "
                         "use F.linear")
    if x.dtype != weight.dtype or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"linear_stream: x and weight must share one of bfloat16, float16, "
                         f"float32, got {x.dtype} and {weight.dtype}")
    if records_grad(x, weight, bias):
        raise ValueError("linear_stream has no backward: call it under torch.no_grad() or with "
                         "inputs that do not require grad")


def linear_stream(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  warm_l2: bool = False) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [..., K] of at most MAX_ROWS rows and weight [N, K],
    bf16 or fp16 (fp32 too: exact fp32 dots, for the interpreter tests); y in x's dtype. Any
    strides; no autograd. One row runs the register GEMV, more the MMA kernel. `warm_l2`: the
    kernel ahead lets this one in at its start and is latency-bound (the decode attention):
    the first programs prefetch the weight to L2 before they wait (module docstring)."""
    K, N = x.shape[-1], weight.shape[0]
    M = math.prod(x.shape[:-1])
    _check(x, weight, bias, M)
    y_MN = torch.empty(M, N, dtype=x.dtype, device=x.device)
    pdl = pdl_launch(x)
    warm = warm_l2 and weight.stride() == (K, 1) and prefetchable(weight, K)
    prefetch_rows = cdiv(N, PREFETCH_PROGRAMS) if warm else 0
    if M == 1 and N > 0:
        x_K = x.reshape(K)
        config = gemv_config(N, K) if x.is_cuda else GEMV_INTERPRETER_BLOCKS
        _gemv_kernel[(cdiv(N, config["BLOCK_N"]),)](
            x_K, weight, bias if bias is not None else weight, y_MN, N, x_K.stride(0),
            *weight.stride(), K=K, HAS_BIAS=bias is not None, PREFETCH_ROWS=prefetch_rows,
            num_stages=1, **config, **pdl)
    elif M > 0 and N > 0:
        x_MK = x.reshape(M, K)
        config = linear_config(N, K) if x.is_cuda else INTERPRETER_BLOCKS
        _linear_kernel[(cdiv(N, config["BLOCK_N"]),)](
            x_MK, weight, bias if bias is not None else weight, y_MN, M, N, K, *x_MK.stride(),
            *weight.stride(), HAS_BIAS=bias is not None,
            DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32", BLOCK_M=MAX_ROWS,
            PREFETCH_ROWS=prefetch_rows, **config, **pdl)
    return y_MN.view(*x.shape[:-1], N)
