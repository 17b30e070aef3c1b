"""Grouped expert MLP on CUDA: a weight-streaming path for few tokens, a tiled Triton grouped GEMM
for prefill-sized inference, and torch._grouped_mm with a fused activation for many tokens
(training included).

Few tokens (decode): each active expert sees a handful of rows, so the layer is bound by reading
its weights once. `_up_kernel` gives every (expert, column tile) one program that streams the
[D, tile] slab(s) of w_in — for SwiGLU the gate and the up tile together — multiplies the
expert's rows (padded to BLOCK_M ≥ 16 for the tensor cores) and writes act(h) directly, so the
[N, 2F] pre-activation never touches memory. With GATHER (the decode path, see
moeflow.model.dispatch) it reads its rows straight from the token matrix through `token_N`,
so no dispatch gather runs before it. `_down_kernel` streams w_out the same way. The grid's
first axis counts active experts, not experts: program i finds the i-th expert with rows in
ends_E itself (`_active_expert`), so at decode the launch holds min(N, E) expert columns of
programs instead of E (batch 1 of Qwen3-30B-A3B: 8 instead of 128, 1440 fewer programs per up
launch and 3840 fewer per down launch that would only have read ends_E and returned), and
weights of idle experts are never read. Launch configurations are autotuned per (D, F, E,
rows-bucket, active-experts bound, activation); the choice is kept in Triton's cache directory
(cache_results), so later processes on the machine skip the timing and run the same tiles (the
same sums). With `counters` (the Experts module passes them) both run as one launch,
`_moe_stream_kernel`: the down programs come after all up programs and each waits for its own
expert's up tiles (a count per expert, released by each up program after its stores), so the
down weights of an expert start streaming as soon as its h is done rather than after the last
up program, and the launch boundary between the kernels is gone. At decode (≤ 16 tokens) the
one launch can also place the rows itself (`placement`): the router then stops after its counts
and ends, and each up program finds its expert's tokens in the routing's ids and ranks them in
the router's priority order (one 16-row tile holds them all), the first column tile writing
the slots, rows and token list (H200, session 24: the b16 router 12.9 -> 9.2 µs per layer in the
decode graph, the experts no slower; benchmarks/results/decode_route). One H200, session 18
(benchmarks/results/decode_experts, decode_timeline): Qwen3-30B-A3B batch 16 (128 rows)
190.8 -> 181.7 µs per call alone, decode step replay 11.57 -> 11.26 ms; batch 1 (8 rows) lost
1.9 µs per call alone but the decode step's replay went 2.914 -> 2.830 ms with it; the two
launches stay for callers without counters (and as the parity reference). Tried and removed
(session 21, same folder): programs that each compute a slice of an expert's hidden units and
its share of the output, summed by the expert's last program (no program waits): 26.6 µs per
batch-1 call against 26.8, +0.1 ms per step in the graph; a probe of the streaming alone
(benchmarks/decode_stream_probe.py) read the 50 MB of gate|up in 14.2-14.7 µs whatever the
program count, split or layout, so the decomposition is not what these kernels lack.

Prefill-sized inference (tens to ~128 rows per expert): moeflow.ops.tiled_mlp_triton, whose
row-tile bodies are this module's `up_rows` and `down_rows`.

Many tokens: on Hopper the tiled kernels' persistent twin (moeflow.ops.persistent_mlp_triton)
where it wins, else (and in training) `torch._grouped_mm` (CUTLASS grouped GEMM), faster than
the tiled kernels from ~256 rows per expert (benchmarks/results/prefill_experts); the
activation between the two GEMMs runs as one Triton pass each way
(moeflow.ops.expert_activation_triton.fused_activation).
Backward of the GEMMs is torch._grouped_mm's own (input and weight grads).

Legend: N expert-sorted rows, D model dim, F expert ffn dim, I = F (GELU) or 2F (SwiGLU), E experts.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch
import triton
import triton.language as tl

from moeflow.ops import expert_bias_triton as bias
from moeflow.ops.expert_activation_triton import activate, fused_activation
from moeflow.ops.expert_mlp import FusedBias, grouped_mlp
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.pdl import launch_next, pdl_launch, wait_for_previous
from moeflow.ops.tickets import last_to_arrive


@triton.jit
def _active_expert(ends_ptr, i, E, BLOCK_E: tl.constexpr):
    """(e, lo, hi): the i-th expert with rows (in expert order) and its rows [lo, hi); hi == lo
    when fewer than i + 1 experts have rows."""
    ee = tl.arange(0, BLOCK_E)
    emask = ee < E
    hi_e = tl.load(ends_ptr + ee, mask=emask, other=0)
    lo_e = tl.load(ends_ptr + ee - 1, mask=emask & (ee > 0), other=0)
    active = emask & (hi_e > lo_e)
    hit = active & (tl.cumsum(active.to(tl.int32), axis=0) == i + 1)
    e = tl.sum(tl.where(hit, ee, 0), axis=0)
    lo = tl.sum(tl.where(hit, lo_e, 0), axis=0).to(tl.int32)
    hi = tl.sum(tl.where(hit, hi_e, 0), axis=0).to(tl.int32)
    return e, lo, hi


def _stream_configs():
    # The first four since the kernels were written; the narrower tiles (more programs per
    # active expert: batch 1 of Qwen3-30B-A3B had only 96 busy programs for 132 SMs) and the
    # 8-warp ones (more bytes in flight per SM) were added for the decode sweep of 2026-12-02.
    return [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bn, bk, w, s in ((64, 128, 4, 4), (128, 64, 4, 4), (32, 256, 4, 3),
                                 (64, 64, 4, 5), (16, 256, 4, 4), (32, 128, 4, 6),
                                 (64, 128, 8, 4), (128, 64, 8, 5))]


@triton.jit
def up_rows(x_ptr, token_ptr, w_e, b_e, h_ptr, m0, hi, n, nmask, D, F, SWIGLU: tl.constexpr,
            HAS_BIAS: tl.constexpr, GATHER: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """act(x[rows] · w_e[:, n] + b_e[n]) into h[rows, n] for the rows [m0, min(m0 + BLOCK_M, hi))
    of one expert (w_e, b_e: its weight [D, I] and bias [I]); SwiGLU multiplies the gate
    columns n by the up columns F + n, both accumulated over the same x tiles."""
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < hi
    if GATHER:
        src = tl.load(token_ptr + rows, mask=rmask, other=0)
    else:
        src = rows
    _up_tile(x_ptr, src, rows, rmask, w_e, b_e, h_ptr, n, nmask, D, F, SWIGLU, HAS_BIAS,
             BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _up_tile(x_ptr, src, dst, rmask, w_e, b_e, h_ptr, n, nmask, D, F, SWIGLU: tl.constexpr,
             HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_K: tl.constexpr):
    """act(x[src] · w_e[:, n] + b_e[n]) into h[dst, n] for the BLOCK_M rows where rmask."""
    I = 2 * F if SWIGLU else F
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, D, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < D
        a = tl.load(x_ptr + src[:, None].to(tl.int64) * D + k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        wg = tl.load(w_e + k[:, None] * I + n[None, :], mask=wmask, other=0.0)
        acc_g = tl.dot(a, wg, acc_g)
        if SWIGLU:
            wu = tl.load(w_e + k[:, None] * I + (F + n)[None, :], mask=wmask, other=0.0)
            acc_u = tl.dot(a, wu, acc_u)
    store_activated(acc_g, acc_u, b_e, h_ptr, dst, rmask, n, nmask, F, SWIGLU, HAS_BIAS)


@triton.jit
def activated(acc_g, acc_u, b_e, n, nmask, F, SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr):
    """act(acc + b_e[n]) in fp32: SwiGLU multiplies the gate columns n (acc_g) by the up columns
    F + n (acc_u); GELU takes acc_g alone."""
    if HAS_BIAS:
        acc_g += tl.load(b_e + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_u += tl.load(b_e + F + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    return activate(acc_g, acc_u, SWIGLU)


@triton.jit
def store_activated(acc_g, acc_u, b_e, h_ptr, dst, rmask, n, nmask, F, SWIGLU: tl.constexpr,
                    HAS_BIAS: tl.constexpr):
    """h[dst, n] = activated(...) for the rows where rmask."""
    tl.store(h_ptr + dst[:, None].to(tl.int64) * F + n[None, :],
             activated(acc_g, acc_u, b_e, n, nmask, F, SWIGLU, HAS_BIAS).to(
                 h_ptr.dtype.element_ty),
             mask=rmask[:, None] & nmask[None, :])


@triton.jit
def down_rows(h_ptr, w_e, b_e, y_ptr, m0, hi, n, nmask, D, F, HAS_BIAS: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              H_FROM_PEERS: tl.constexpr = False, w_pre=None, PRE_K: tl.constexpr = 0):
    """h[rows] · w_e[:, n] + b_e[n] into y[rows, n] for the rows [m0, min(m0 + BLOCK_M, hi)) of
    one expert (w_e, b_e: its weight [F, D] and bias [D]). H_FROM_PEERS: other programs of this
    launch stored h: read it through L2 (.cg), never from this SM's L1. PRE_K > 0: w_pre holds
    w_e[:PRE_K, n], loaded by the caller."""
    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < hi
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    if PRE_K > 0:
        kp = tl.arange(0, PRE_K)
        h_pre = tl.load(h_ptr + rows[:, None].to(tl.int64) * F + kp[None, :],
                        mask=rmask[:, None] & (kp < F)[None, :], other=0.0,
                        cache_modifier=".cg" if H_FROM_PEERS else "")
        acc = tl.dot(h_pre, w_pre, acc)
    for k0 in range(PRE_K, F, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < F
        a = tl.load(h_ptr + rows[:, None].to(tl.int64) * F + k[None, :],
                    mask=rmask[:, None] & kmask[None, :], other=0.0,
                    cache_modifier=".cg" if H_FROM_PEERS else "")
        w = tl.load(w_e + k[:, None] * D + n[None, :], mask=kmask[:, None] & nmask[None, :],
                    other=0.0)
        acc = tl.dot(a, w, acc)
    if HAS_BIAS:
        acc += tl.load(b_e + n, mask=nmask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None].to(tl.int64) * D + n[None, :],
             acc.to(y_ptr.dtype.element_ty), mask=rmask[:, None] & nmask[None, :])


@triton.autotune(configs=_stream_configs(),
                 key=["D", "F", "E", "M_BUCKET", "A_BUCKET", "SWIGLU"], reset_to_zero=[],
                 cache_results=True)
@triton.jit
def _up_kernel(x_ptr, token_ptr, ends_ptr, w_ptr, b_ptr, h_ptr, D, F, E, M_BUCKET, A_BUCKET,
               SWIGLU: tl.constexpr, HAS_BIAS: tl.constexpr, GATHER: tl.constexpr,
               BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    launch_next(PDL)
    e, lo, hi = _active_expert(ends_ptr, tl.program_id(0), E, BLOCK_E)
    pid_n = tl.program_id(1)
    if hi <= lo:
        return
    I = 2 * F if SWIGLU else F
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < F
    w_e = w_ptr + e.to(tl.int64) * D * I
    for m0 in range(lo, hi, BLOCK_M):
        up_rows(x_ptr, token_ptr, w_e, b_ptr + e * I, h_ptr, m0, hi, n, nmask, D, F, SWIGLU,
                HAS_BIAS, GATHER, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.autotune(configs=_stream_configs(), key=["D", "F", "E", "M_BUCKET", "A_BUCKET"],
                 reset_to_zero=[], cache_results=True)
@triton.jit
def _down_kernel(h_ptr, ends_ptr, w_ptr, b_ptr, y_ptr, D, F, E, M_BUCKET, A_BUCKET,
                 HAS_BIAS: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    launch_next(PDL)
    e, lo, hi = _active_expert(ends_ptr, tl.program_id(0), E, BLOCK_E)
    pid_n = tl.program_id(1)
    if hi <= lo:
        return
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < D
    w_e = w_ptr + e.to(tl.int64) * F * D
    for m0 in range(lo, hi, BLOCK_M):
        down_rows(h_ptr, w_e, b_ptr + e * D, y_ptr, m0, hi, n, nmask, D, F, HAS_BIAS, BLOCK_M,
                  BLOCK_N, BLOCK_K)


def _moe_stream_configs():
    # (UP_N, UP_K, DOWN_N, DOWN_K, warps, stages): the two kernels' tiles in one launch (one
    # warps / stages setting for both), around what the separate kernels were tuned to (batch
    # 1 of Qwen3-30B-A3B: up 64 × 64, down 128 × 64). An L2 prefetch of the down tile while
    # its expert's h was computed was offered beside each (session 18) and never chosen.
    tiles = ((64, 64, 128, 64, 4, 5), (64, 64, 64, 128, 4, 4), (64, 128, 128, 64, 4, 4),
             (32, 128, 64, 64, 4, 5), (128, 64, 128, 64, 8, 4), (64, 64, 128, 64, 8, 5))
    return [triton.Config({"UP_N": un, "UP_K": uk, "DOWN_N": dn, "DOWN_K": dk, "PRE_K": 0},
                          num_warps=w, num_stages=st) for un, uk, dn, dk, w, st in tiles]


# At most this many active experts (batch 1 of a top-8 model) the one launch runs
# FEW_ACTIVE_CONFIG instead of autotuning: inside the served batch-1 decode graph of
# Qwen3-30B-A3B (H200, session 27, benchmarks/results/decode_timeline: each config of
# _moe_stream_configs forced, two passes) 64 x 64 up and 128 x 64 down tiles on 4 warps ended
# 24.9-25.0 µs after the router, the 8-warp 128 x 64 ones 29.4-29.7; autotuning the kernel
# alone picked the latter on one machine (its served batch-1 step: 2.96 ms; pinned, on
# another machine: 2.735). PRE_K 256 (session 28, three calls on three machines, each variant
# forced twice in one process by benchmarks/decode_knobs.py): a down program's first 256 w_out
# rows (a third of Qwen3's 768) loaded before its wait took the experts' end step 25.13-25.47
# -> 24.47-24.75 µs (-0.4 to -0.85 a layer); 128 rows gained less (24.9), and narrower down
# tiles that preload more (64 x 512, 32 x 512 or all 768) or 8 warps lost 0.8-9 µs (more
# programs than stay resident, or fewer per SM).
# Half-precision weights only: in fp32 this config's 5 stages and preloaded rows need 278,528
# bytes of shared memory, over the 232,448 a block may use on an H200 (OutOfResources until
# session 30 where fp32 experts were forced onto this kernel, Backends(experts="stream"); "auto"
# takes it for bf16 only), so fp32 weights take the autotuner's configs.
FEW_ACTIVE_EXPERTS = 8
FEW_ACTIVE_CONFIG = {"UP_N": 64, "UP_K": 64, "DOWN_N": 128, "DOWN_K": 64, "PRE_K": 256,
                     "num_warps": 4, "num_stages": 5}


@triton.jit
def _routed_ids(ids_ptr, T, K, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """The router's ids [T, K] as a [BLOCK_M, BLOCK_C] tile (-1 past them), for _expert_tokens;
    loaded on its own so that it is issued beside the loads that find the program's expert."""
    t = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    return tl.load(ids_ptr + t[:, None] * K + c[None, :],
                   mask=(t < T)[:, None] & (c < K)[None, :], other=-1)


@triton.jit
def _expert_tokens(ids, e, T, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
    """Decode (T ≤ BLOCK_M tokens, dropless): (t, k_t, mine, rank) over the tokens t of the ids
    tile (_routed_ids): whether token t chose expert e (`mine`), as its choice k_t, and its
    rank among e's tokens in the router's priority order (choice, then token) — its queue slot,
    so its sorted row is the expert's first row + rank, the row the router's pass 2 gives it."""
    t = tl.arange(0, BLOCK_M)
    c = tl.arange(0, BLOCK_C)
    hit = ids == e
    mine = tl.max(hit.to(tl.int32), axis=1) > 0
    k_t = tl.sum(tl.where(hit, c[None, :], 0), axis=1)
    p = k_t * T + t
    rank = tl.sum(((p[None, :] < p[:, None]) & mine[None, :]).to(tl.int32), axis=1)
    return t, k_t, mine, rank


@triton.autotune(configs=_moe_stream_configs(),
                 key=["D", "F", "E", "M_BUCKET", "A_BUCKET", "SWIGLU"], reset_to_zero=[],
                 cache_results=True)
@triton.jit
def _moe_stream_kernel(x_ptr, token_ptr, ends_ptr, w_in_ptr, b_in_ptr, h_ptr, w_out_ptr,
                       b_out_ptr, y_ptr, count_ptr, ids_ptr, slots_ptr, row_ptr, T, K,
                       D, F, E, ACTIVE, M_BUCKET, A_BUCKET,
                       SWIGLU: tl.constexpr, HAS_IN_BIAS: tl.constexpr,
                       HAS_OUT_BIAS: tl.constexpr, GATHER: tl.constexpr, PLACE: tl.constexpr,
                       BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
                       UP_N: tl.constexpr, UP_K: tl.constexpr, DOWN_N: tl.constexpr,
                       DOWN_K: tl.constexpr, PRE_K: tl.constexpr, PDL: tl.constexpr):
    """_up_kernel and _down_kernel in one launch (see expert_mlp_stream). Programs [0, U) are
    the up kernel's, expert slot by expert slot (U = ACTIVE · ⌈F/UP_N⌉); each stores its h tile
    and then releases it by a count per expert slot. Programs from U are the down kernel's:
    each waits until its expert's up programs have all counted, then streams its w_out tile. The
    last down program of an expert puts both of its counts back to 0 for the next launch.
    PRE_K > 0: a down program loads the first PRE_K rows of its w_out tile before it waits (the
    weights do not depend on h), so that part streams while the up programs run.
    Only a program from U waits, and only for programs below U: blocks are dispatched in order,
    so those are running or done, and the wait ends.
    PLACE (decode, T ≤ BLOCK_M tokens): the router left the rows unplaced; each up program
    finds its expert's tokens in the ids [T, K] (_expert_tokens; the ids loaded beside the ends
    that find its expert), and the first column tile's program writes their slots, rows and the
    token list (token_ptr, an output then)."""
    wait_for_previous(PDL)
    launch_next(PDL)
    pid = tl.program_id(0)
    up_tiles = tl.cdiv(F, UP_N)
    if pid < ACTIVE * up_tiles:
        i = pid // up_tiles
        if PLACE:  # issued with the loads of the ends: the ids do not depend on the expert
            ids = _routed_ids(ids_ptr, T, K, BLOCK_M, BLOCK_C)
        e, lo, hi = _active_expert(ends_ptr, i, E, BLOCK_E)
        if hi > lo:
            I = 2 * F if SWIGLU else F
            n = (pid % up_tiles) * UP_N + tl.arange(0, UP_N)
            w_e = w_in_ptr + e.to(tl.int64) * D * I
            if PLACE:
                t, k_t, mine, rank = _expert_tokens(ids, e, T, BLOCK_M, BLOCK_C)
                dst = lo + rank
                first = mine & (pid % up_tiles == 0)
                flat = t * K + k_t
                tl.store(slots_ptr + flat, rank.to(tl.int64), mask=first)
                tl.store(row_ptr + flat, dst.to(tl.int64), mask=first)
                tl.store(token_ptr + dst, t.to(tl.int64), mask=first)
                _up_tile(x_ptr, t, dst, mine, w_e, b_in_ptr + e * I, h_ptr, n, n < F, D, F,
                         SWIGLU, HAS_IN_BIAS, BLOCK_M, UP_N, UP_K)
            else:
                for m0 in range(lo, hi, BLOCK_M):
                    up_rows(x_ptr, token_ptr, w_e, b_in_ptr + e * I, h_ptr, m0, hi, n, n < F,
                            D, F, SWIGLU, HAS_IN_BIAS, GATHER, BLOCK_M, UP_N, UP_K)
            tl.debug_barrier()  # every thread's stores of the tile, then one release
            tl.atomic_add(count_ptr + i, 1, sem="release", scope="gpu")
    else:
        q = pid - ACTIVE * up_tiles
        down_tiles = tl.cdiv(D, DOWN_N)
        i = q // down_tiles
        e, lo, hi = _active_expert(ends_ptr, i, E, BLOCK_E)
        if hi > lo:
            w_e = w_out_ptr + e.to(tl.int64) * F * D
            n = (q % down_tiles) * DOWN_N + tl.arange(0, DOWN_N)
            w_pre = None
            if PRE_K > 0:
                k_pre = tl.arange(0, PRE_K)
                w_pre = tl.load(w_e + k_pre[:, None] * D + n[None, :],
                                mask=(k_pre < F)[:, None] & (n < D)[None, :], other=0.0)
            seen = tl.atomic_add(count_ptr + i, 0, sem="acquire", scope="gpu")
            while seen < up_tiles:
                seen = tl.atomic_add(count_ptr + i, 0, sem="acquire", scope="gpu")
            tl.debug_barrier()  # the acquire above orders every thread's loads after it
            for m0 in range(lo, hi, BLOCK_M):
                down_rows(h_ptr, w_e, b_out_ptr + e * D, y_ptr, m0, hi, n, n < D, D, F,
                          HAS_OUT_BIAS, BLOCK_M, DOWN_N, DOWN_K, True, w_pre, PRE_K)
            if last_to_arrive(count_ptr + E + i, down_tiles):
                tl.store(count_ptr + i, 0)


def m_bucket(n_rows: int, n_experts: int) -> int:
    """Autotune key: rows per expert, rounded to a power of two (configs differ by load)."""
    return next_power_of_2(max(1, cdiv(n_rows, n_experts)))


def tune_keys(n_rows: int, n_experts: int) -> tuple[int, int]:
    """The expert kernels' autotune keys after E: rows per expert (m_bucket) and the bound on
    experts with rows, min(rows, E), to a power of two. Batch 1 and 16 of Qwen3-30B-A3B (8 and
    128 rows over 128 experts) share rows-per-expert bucket 1 but not the best tiles (8 vs ~82
    busy experts; benchmarks/results/decode_experts, session 15)."""
    return m_bucket(n_rows, n_experts), next_power_of_2(min(n_rows, n_experts))


class ExpertBuffers(NamedTuple):
    """One call's operands (contiguous), outputs and autotune keys (expert_buffers)."""

    x_ND: torch.Tensor
    ends_E: torch.Tensor
    w_in_EDI: torch.Tensor
    w_out_EFD: torch.Tensor
    h_NF: torch.Tensor
    y_ND: torch.Tensor
    keys: tuple[int, int]  # tune_keys'


class UpDown(NamedTuple):
    """An up kernel (rows gathered through rows_N, x · w_in, the activation, h stored) and a
    down kernel (h · w_out, y stored) with the signatures of _up_kernel and _down_kernel, their
    grids, and the meta-parameters they take fixed; `interpreter`: the fixed config for
    Triton's interpreter (CPU tests), which cannot autotune."""

    up: Callable
    down: Callable
    up_grid: Callable
    down_grid: Callable
    blocks: dict
    interpreter: dict


def expert_buffers(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                   w_out_EFD: torch.Tensor, rows_N: torch.Tensor | None) -> ExpertBuffers:
    """The contiguous operands, h and y (unwritten) and the autotune keys of one call of the
    expert kernels over N rows (rows_N's, else x_ND's)."""
    N, D = x_ND.shape if rows_N is None else (rows_N.shape[0], x_ND.shape[1])
    E, F = w_out_EFD.shape[0], w_out_EFD.shape[1]
    x_ND = x_ND.contiguous()
    return ExpertBuffers(x_ND, ends_E.contiguous(), w_in_EDI.contiguous(),
                         w_out_EFD.contiguous(),
                         torch.empty(N, F, dtype=x_ND.dtype, device=x_ND.device),
                         torch.empty(N, D, dtype=x_ND.dtype, device=x_ND.device),
                         tune_keys(N, E))


def run_up_down(kernels: UpDown, buf: ExpertBuffers, b_in_EI: torch.Tensor | None,
                b_out_ED: torch.Tensor | None, activation: str,
                rows_N: torch.Tensor | None) -> torch.Tensor:
    """Launch the up and the down kernel over buf's rows; returns buf.y_ND. Rows past
    ends_E[-1] are left unwritten (combine never reads them)."""
    up, down, blocks = kernels.up, kernels.down, kernels.blocks
    if not buf.x_ND.is_cuda:
        up, down, blocks = up.fn, down.fn, dict(blocks, **kernels.interpreter)
    E = buf.w_out_EFD.shape[0]
    D, F = buf.y_ND.shape[1], buf.h_NF.shape[1]
    block_e = next_power_of_2(E)
    pdl = pdl_launch(buf.x_ND)
    ends, w_in, w_out = buf.ends_E, buf.w_in_EDI, buf.w_out_EFD
    up[kernels.up_grid](
        buf.x_ND, rows_N if rows_N is not None else ends, ends, w_in,
        b_in_EI if b_in_EI is not None else w_in, buf.h_NF, D, F, E, *buf.keys,
        SWIGLU=activation == "swiglu", HAS_BIAS=b_in_EI is not None, GATHER=rows_N is not None,
        BLOCK_E=block_e, **blocks, **pdl)
    down[kernels.down_grid](
        buf.h_NF, ends, w_out, b_out_ED if b_out_ED is not None else w_out, buf.y_ND, D, F, E,
        *buf.keys, HAS_BIAS=b_out_ED is not None, BLOCK_E=block_e, **blocks, **pdl)
    return buf.y_ND


def _moe_stream(buf: ExpertBuffers, b_in_EI, b_out_ED, rows_N, counters, activation, meta,
                placement) -> None:
    """Launch _moe_stream_kernel (one launch for the up and the down kernels' programs)."""
    x_ND, ends, w_in_EDI, w_out_EFD, h_NF, y_ND, keys = buf
    D, E, F = x_ND.shape[1], w_out_EFD.shape[0], w_out_EFD.shape[1]
    if placement is not None:
        ids_TK, slots_TK, row_TK = placement
        T, K = ids_TK.shape
        if rows_N is None or T > meta["BLOCK_M"]:
            raise ValueError(f"expert_mlp_stream: placing the rows needs the token list to "
                             f"write and at most {meta['BLOCK_M']} tokens, got {T}")
    else:
        ids_TK = slots_TK = row_TK = ends
        T, K = 0, 1
    if counters.dtype != torch.int32 or counters.numel() < COUNTERS_PER_EXPERT * E:
        raise ValueError(f"expert_mlp_stream: counters must be int32 with "
                         f"{COUNTERS_PER_EXPERT * E} entries for "
                         f"{E} experts, got {counters.numel()} {counters.dtype}")
    active = min(h_NF.shape[0], E)
    kernel = _moe_stream_kernel
    if not x_ND.is_cuda:  # the interpreter cannot autotune: one fixed config
        kernel = kernel.fn
        meta = dict(meta, UP_N=32, UP_K=32, DOWN_N=32, DOWN_K=32, PRE_K=32)
    elif keys[1] <= FEW_ACTIVE_EXPERTS and w_in_EDI.element_size() <= 2:
        kernel = kernel.fn
        meta = dict(meta, **FEW_ACTIVE_CONFIG)
    grid = lambda m: (active * (cdiv(F, m["UP_N"]) + cdiv(D, m["DOWN_N"])),)  # noqa: E731
    kernel[grid](
        x_ND, rows_N if rows_N is not None else ends, ends, w_in_EDI,
        b_in_EI if b_in_EI is not None else w_in_EDI, h_NF, w_out_EFD,
        b_out_ED if b_out_ED is not None else w_out_EFD, y_ND, counters, ids_TK, slots_TK,
        row_TK, T, K, D, F, E, active, *keys, SWIGLU=activation == "swiglu",
        HAS_IN_BIAS=b_in_EI is not None, HAS_OUT_BIAS=b_out_ED is not None,
        GATHER=rows_N is not None, PLACE=placement is not None,
        BLOCK_C=next_power_of_2(K), **meta)


# expert_mlp_stream's counters per expert: its up tiles done, its down tiles done.
COUNTERS_PER_EXPERT = 2


def stream_counters(num_experts: int, device: torch.device) -> torch.Tensor:
    """expert_mlp_stream's counters for one layer's experts: int32 zeros (every launch leaves
    them so), for one launch at a time (the Experts module keeps its own,
    moeflow.ops.device_counters)."""
    return torch.zeros(COUNTERS_PER_EXPERT * num_experts, dtype=torch.int32, device=device)


def expert_mlp_stream(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                      b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                      b_out_ED: torch.Tensor | None, activation: str,
                      parked: bool = True, rows_N: torch.Tensor | None = None,
                      counters: torch.Tensor | None = None,
                      placement: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """Few-token path (inference only: no autograd): the weight-streaming kernels. Rows past
    ends_E[-1] are left unwritten (combine never reads them), so `parked` needs no work here.
    `rows_N`: x_ND holds the tokens and row n is x_ND[rows_N[n]], gathered by the up kernel.
    `counters` (stream_counters): the up and down kernels run as one launch, each down program
    waiting for its expert's h instead of the whole up kernel (no kernel boundary between them;
    the same tiles give the same values).
    `placement` (ids_TK, slots_TK, row_TK), with counters, at most 16 tokens (x_ND holds them):
    the router left the rows unplaced (route_decode_fused's place_rows); the up programs find
    each expert's tokens in ids_TK, and they write the slots, rows and rows_N (an output then)
    that the router's pass 2 would have, the sorted rows coming out the same."""
    if placement is not None and counters is None:
        raise ValueError("expert_mlp_stream: placing the rows needs the counters (one launch)")
    buf = expert_buffers(x_ND, ends_E, w_in_EDI, w_out_EFD, rows_N)
    N, F = buf.h_NF.shape
    if N == 0:
        return buf.y_ND
    D, E = buf.y_ND.shape[1], buf.w_out_EFD.shape[0]
    bucket = buf.keys[0]
    blocks = {"BLOCK_M": 16 if bucket <= 16 else 32 if bucket <= 32 else 64}
    if counters is not None:
        _moe_stream(buf, b_in_EI, b_out_ED, rows_N, counters, activation,
                    dict(blocks, BLOCK_E=next_power_of_2(E), **pdl_launch(buf.x_ND)), placement)
        return buf.y_ND
    # At most N experts have rows: one column of programs per possibly active expert.
    active = min(N, E)
    kernels = UpDown(_up_kernel, _down_kernel,
                     lambda meta: (active, cdiv(F, meta["BLOCK_N"])),
                     lambda meta: (active, cdiv(D, meta["BLOCK_N"])),
                     blocks, {"BLOCK_N": 32, "BLOCK_K": 32})
    return run_up_down(kernels, buf, b_in_EI, b_out_ED, activation, rows_N)


def expert_mlp_grouped_fused(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                             b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                             b_out_ED: torch.Tensor | None, activation: str,
                             parked: bool = True, rows_N: torch.Tensor | None = None
                             ) -> torch.Tensor:
    """Many-token path: grouped_mm → fused activation → grouped_mm (autograd through all);
    the first bias added inside the activation's pass, the second in one pass after the second
    GEMM (moeflow.ops.expert_bias_triton)."""
    return grouped_mlp(x_ND, ends_E, w_in_EDI, b_in_EI, w_out_EFD, b_out_ED,
                       lambda h: fused_activation(h, activation), parked, rows_N,
                       fused_bias=_fused_bias(activation))


@functools.cache
def _fused_bias(activation: str) -> FusedBias:
    return FusedBias(functools.partial(bias.activate_with_bias, activation=activation),
                     bias.add_bias)
