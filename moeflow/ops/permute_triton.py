"""Token permutation on CUDA: the dispatch mapping table + gather in one launch, and the
weighted combine, with their backward passes.

Why: the reference builds the plan with an argsort over T·K keys, an inverse permutation and an
index gather (≈8 launches plus a sort), and combines through a [T, K, D] temporary. Here the
row of every assignment is known in closed form from the router's queue slots:
  kept:    row = start[e] + slot            (start = exclusive cumsum of counts after dropping)
  dropped: row = total_kept + (dropped assignments before it in (t, k) order)
so one program per block of assignments writes row_TK, token_N and copies the token's row into
expert order — no sort. `combine` reads each token's K rows once and sums them in k order in
fp32 after rounding each weighted row to the activation dtype, which is exactly what the
reference's `(y_TKD * w_TK).sum(1)` computes, so in bf16 the two agree bit for bit (in fp32
the GPU fuses the multiply-add, one rounding fewer than torch: equal to fp32 rounding).

Backward: gather's gradient sums each token's kept rows (parked rows carry no gradient);
combine's gradient scatters w·g to each row and returns d weights = <g_out[t], y[row]>.

Legend: T tokens, K top-k, N = T·K sorted rows, D model dim, E experts.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moeflow.ops.backend import records_grad
from moeflow.ops.grid import cdiv, next_power_of_2

_BLOCK_A = 16


@triton.jit
def _dispatch_kernel(x_ptr, ids_ptr, slots_ptr, kept_ptr, counts_ptr, kept_cum_ptr,
                     row_ptr, token_ptr, ends_ptr, out_ptr, N, E, D,
                     K: tl.constexpr, HAS_DROPS: tl.constexpr, GATHER: tl.constexpr,
                     BLOCK_A: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    ecols = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + ecols, mask=ecols < E, other=0)
    ends = tl.cumsum(counts, axis=0)
    if pid == 0:
        tl.store(ends_ptr + ecols, ends, mask=ecols < E)
    starts = ends - counts
    total_kept = tl.sum(counts)

    a = pid * BLOCK_A + tl.arange(0, BLOCK_A)
    valid = a < N
    e = tl.load(ids_ptr + a, mask=valid, other=0)
    slot = tl.load(slots_ptr + a, mask=valid, other=0)
    start = tl.sum(tl.where(ecols[None, :] == e[:, None], starts[None, :], 0), axis=1)
    row = start + slot
    if HAS_DROPS:
        kept = tl.load(kept_ptr + a, mask=valid, other=1) != 0
        # A dropped assignment's rank among the dropped ones: the assignments ahead of it less
        # the kept ones among them (kept_cum: inclusive running count of kept assignments).
        kept_ahead = tl.load(kept_cum_ptr + a, mask=valid, other=0)
        row = tl.where(kept, row, total_kept + a - kept_ahead)
    t = a // K
    tl.store(row_ptr + a, row, mask=valid)
    tl.store(token_ptr + row, t.to(tl.int64), mask=valid)
    if GATHER:
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = valid[:, None] & (d < D)[None, :]
            v = tl.load(x_ptr + t[:, None].to(tl.int64) * D + d[None, :], mask=m)
            tl.store(out_ptr + row[:, None] * D + d[None, :], v, mask=m)


@triton.jit
def _sum_rows_kernel(y_ptr, row_ptr, kept_ptr, w_ptr, out_ptr, T, D,
                     K: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_T: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """out[t] = Σ_k kept[t,k] · (w[t,k] ·) y[row[t,k]], in k order, fp32 accumulation."""
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    tmask = t < T
    m = tmask[:, None] & (d < D)[None, :]
    acc = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    for k in tl.static_range(K):
        row = tl.load(row_ptr + t * K + k, mask=tmask, other=0)
        kept = tl.load(kept_ptr + t * K + k, mask=tmask, other=0) != 0
        y = tl.load(y_ptr + row[:, None] * D + d[None, :], mask=m & kept[:, None], other=0.0)
        if WEIGHTED:
            # bf16·bf16 is exact in fp32; one rounding to the row dtype, as torch's bf16 mul.
            w = tl.load(w_ptr + t * K + k, mask=tmask, other=0.0).to(y.dtype).to(tl.float32)
            acc += (y.to(tl.float32) * w[:, None]).to(y.dtype).to(tl.float32)
        else:
            acc += y.to(tl.float32)
    tl.store(out_ptr + t[:, None].to(tl.int64) * D + d[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m)


@triton.jit
def _combine_bwd_kernel(g_ptr, y_ptr, row_ptr, kept_ptr, w_ptr, gy_ptr, gw_ptr, T, D,
                        K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    for k in tl.static_range(K):
        row = tl.load(row_ptr + t * K + k, mask=tmask, other=0)
        kept = tl.load(kept_ptr + t * K + k, mask=tmask, other=0) != 0
        w = tl.load(w_ptr + t * K + k, mask=tmask, other=0.0)
        dot = tl.zeros([BLOCK_T], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            m = tmask[:, None] & (d < D)[None, :]
            g = tl.load(g_ptr + t[:, None].to(tl.int64) * D + d[None, :], mask=m, other=0.0)
            y = tl.load(y_ptr + row[:, None] * D + d[None, :], mask=m & kept[:, None], other=0.0)
            w_g = w.to(g.dtype).to(tl.float32)
            gy = g.to(tl.float32) * w_g[:, None]
            # Kept assignments only: in a capacity-slot layout a dropped one may name a kept
            # one's row (moeflow.parallel.dispatcher), and its zero must not overwrite that.
            tl.store(gy_ptr + row[:, None] * D + d[None, :], gy.to(gy_ptr.dtype.element_ty),
                     mask=m & kept[:, None])
            dot += tl.sum(g.to(tl.float32) * y.to(tl.float32), axis=1)
        tl.store(gw_ptr + t * K + k, tl.where(kept, dot, 0.0), mask=tmask)


def _sum_rows(y_ND, row_TK, kept_i8, w_TK, T, weighted, *, block_t: int = 1,
              block_d: int = 256, num_warps: int = 2):
    """out_TD of _sum_rows_kernel, `block_t` tokens × `block_d` columns (at most D rounded up to
    a power of two) per program: the tile changes the speed, not the bits (each output element
    is its own sum in k order). The defaults were the fastest of 69 tiles in
    benchmarks/elementwise_sweep.py on the H200 at 128, 2048 and 8192 tokens of the Qwen3-30B-A3B
    combine (2048 tokens: 22.3 µs against the first version's 4 × 512 on 4 warps, 25.0 µs)."""
    K = row_TK.shape[1]
    D = y_ND.shape[1]
    grid, block_d = _sum_rows_tiles(T, D, block_t, block_d, num_warps)
    out = torch.empty(T, D, dtype=y_ND.dtype, device=y_ND.device)
    if T == 0:
        return out
    _sum_rows_kernel[grid](y_ND, row_TK, kept_i8, w_TK if weighted else y_ND, out, T, D, K=K,
                           WEIGHTED=weighted, BLOCK_T=block_t, BLOCK_D=block_d,
                           num_warps=num_warps)
    return out


@functools.lru_cache(maxsize=1024)
def _sum_rows_tiles(T: int, D: int, block_t: int, block_d: int, num_warps: int
                    ) -> tuple[tuple[int, int], int]:
    """(grid, block_d) of a _sum_rows launch, checked; cached per shape (the combine's host
    arithmetic is asked on every eager layer call)."""
    for name, v in (("block_t", block_t), ("block_d", block_d), ("num_warps", num_warps)):
        if v < 1 or v & (v - 1):
            raise ValueError(f"combine: {name} must be a power of two, got {v}")
    block_d = min(next_power_of_2(D), block_d)
    return (cdiv(T, block_t), cdiv(D, block_d)), block_d


def _dispatch(x_TD, ids_TK, slots_TK, kept_TK, counts_E, has_drops: bool, gather: bool):
    """(x_ND or None, row_TK, token_N, ends_E) from one _dispatch_kernel launch; `gather`: also
    copy the rows into expert order."""
    T, K = ids_TK.shape
    N, D, E = T * K, x_TD.shape[1], counts_E.shape[0]
    dev = x_TD.device
    kept_i8 = kept_TK.view(torch.int8)
    # One cumsum launch (was four: not, cast, cumsum, subtract).
    kept_cum = torch.cumsum(kept_i8.view(-1), 0, dtype=torch.int64) if has_drops else ids_TK
    row_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    token_N = torch.empty(N, dtype=torch.int64, device=dev)
    ends_E = torch.empty(E, dtype=torch.int64, device=dev)
    x_ND = torch.empty(N, D, dtype=x_TD.dtype, device=dev) if gather else None
    if N > 0:
        _dispatch_kernel[(cdiv(N, _BLOCK_A),)](
            x_TD, ids_TK, slots_TK, kept_i8, counts_E, kept_cum, row_TK, token_N, ends_E,
            x_ND if gather else x_TD, N, E, D, K=K, HAS_DROPS=has_drops, GATHER=gather,
            BLOCK_A=_BLOCK_A, BLOCK_E=next_power_of_2(E),
            BLOCK_D=min(next_power_of_2(D), 256), num_warps=4)
    else:
        ends_E.zero_()
    return x_ND, row_TK, token_N, ends_E


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, ids_TK, slots_TK, kept_TK, counts_E, has_drops):
        x_ND, row_TK, token_N, ends_E = _dispatch(x_TD, ids_TK, slots_TK, kept_TK, counts_E,
                                                  has_drops, gather=True)
        ctx.save_for_backward(row_TK, kept_TK.view(torch.int8))
        ctx.mark_non_differentiable(row_TK, token_N, ends_E)
        ctx.set_materialize_grads(False)  # no zero fills for the integer outputs' gradients
        return x_ND, row_TK, token_N, ends_E

    @staticmethod
    def backward(ctx, g_x_ND, g_row, g_token, g_ends):
        if g_x_ND is None:
            return (None,) * 6
        row_TK, kept_i8 = ctx.saved_tensors
        return _sum_rows(g_x_ND.contiguous(), row_TK, kept_i8, None, row_TK.shape[0],
                         False), None, None, None, None, None


class _GatherPlanned(torch.autograd.Function):
    """x_TD's rows in a layout the router planned (its token list), with _Gather's backward:
    each token's gradient the sum of its kept rows', in choice order (no atomics)."""

    @staticmethod
    def forward(ctx, x_TD, token_N, row_TK, kept_TK):
        ctx.save_for_backward(row_TK, kept_TK.view(torch.int8))
        return x_TD.index_select(0, token_N)

    @staticmethod
    def backward(ctx, g_x_ND):
        row_TK, kept_i8 = ctx.saved_tensors
        return _sum_rows(g_x_ND.contiguous(), row_TK, kept_i8, None, row_TK.shape[0],
                         False), None, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, w_TK, row_TK, kept_TK, packed):
        kept_i8 = kept_TK.view(torch.int8)
        ctx.save_for_backward(y_ND, w_TK, row_TK, kept_i8)
        ctx.packed = packed
        return _sum_rows(y_ND, row_TK, kept_i8, w_TK, row_TK.shape[0], True)

    @staticmethod
    def backward(ctx, g_TD):
        y_ND, w_TK, row_TK, kept_i8 = ctx.saved_tensors
        T, K = row_TK.shape
        D = y_ND.shape[1]
        # The kernel writes the kept assignments' rows. Packed, those are all the rows the
        # experts read (dropped ones are parked past ends_E[-1], which nothing reads); else
        # (empty capacity slots) the rest must be zeros.
        g_y = torch.empty_like(y_ND) if ctx.packed else torch.zeros_like(y_ND)
        g_w = torch.empty(T, K, dtype=torch.float32, device=y_ND.device)
        if T > 0:
            grid, block_d = _sum_rows_tiles(T, D, 4, 512, 4)  # 4 tokens × ≤ 512 columns
            _combine_bwd_kernel[grid[:1]](
                g_TD.contiguous(), y_ND, row_TK, kept_i8, w_TK, g_y, g_w, T, D, K=K,
                BLOCK_T=4, BLOCK_D=block_d, num_warps=4)
        return g_y, g_w.to(w_TK.dtype), None, None, None


def dispatch_triton(x_TD: torch.Tensor, ids_TK: torch.Tensor, slots_TK: torch.Tensor,
                    kept_TK: torch.Tensor, counts_E: torch.Tensor, may_drop: bool):
    """(x_ND, row_TK, token_N, ends_E): rows in (expert, queue slot) order, dropped ones last.
    may_drop=False (dropless routing) skips the dropped-rank prefix sum."""
    if not records_grad(x_TD):  # the kernel alone: Function.apply costs ~4 µs of host per call
        return _dispatch(x_TD.contiguous(), ids_TK.contiguous(), slots_TK.contiguous(),
                         kept_TK.contiguous(), counts_E.contiguous(), may_drop, gather=True)
    return _Gather.apply(x_TD.contiguous(), ids_TK.contiguous(), slots_TK.contiguous(),
                         kept_TK.contiguous(), counts_E.contiguous(), may_drop)


def gather_planned_triton(x_TD: torch.Tensor, token_N: torch.Tensor, row_TK: torch.Tensor,
                          kept_TK: torch.Tensor) -> torch.Tensor:
    """x_TD[token_N] under autograd, for a layout the router planned (the one-launch router's
    ExpertOrder: token_N lists each row's token, row_TK each assignment's row): one gather in
    the forward, one Triton sum of each token's kept rows in the backward."""
    return _GatherPlanned.apply(x_TD.contiguous(), token_N, row_TK, kept_TK.contiguous())


def dispatch_plan_triton(x_TD: torch.Tensor, ids_TK: torch.Tensor, slots_TK: torch.Tensor,
                         kept_TK: torch.Tensor, counts_E: torch.Tensor, may_drop: bool):
    """(row_TK, token_N, ends_E) of dispatch_triton without the gather: for experts that read
    their rows through token_N themselves (no autograd)."""
    _, row_TK, token_N, ends_E = _dispatch(x_TD, ids_TK.contiguous(), slots_TK.contiguous(),
                                           kept_TK.contiguous(), counts_E.contiguous(),
                                           may_drop, gather=False)
    return row_TK, token_N, ends_E


def combine_triton(y_ND: torch.Tensor, weights_TK: torch.Tensor, row_TK: torch.Tensor,
                   kept_TK: torch.Tensor, packed: bool = False) -> torch.Tensor:
    """out_TD = Σ_k kept · weight · y[row_TK] (same rounding as the reference).
    `packed`: the layout is DispatchPlan.packed's (the experts' rows are exactly the kept
    assignments', one each), so the backward need not zero y's gradient first (a launch fewer)."""
    if not records_grad(y_ND, weights_TK):  # the kernel alone, as dispatch_triton
        return _sum_rows(y_ND.contiguous(), row_TK, kept_TK.contiguous().view(torch.int8),
                         weights_TK.contiguous(), row_TK.shape[0], True)
    return _Combine.apply(y_ND.contiguous(), weights_TK.contiguous(), row_TK, kept_TK.contiguous(),
                          packed)
