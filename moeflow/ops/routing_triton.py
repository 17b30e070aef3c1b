"""Fused routing on CUDA: router logits → top-k ids and weights → queue slots, drops, counts, losses.

Why: the plain-torch router issues ~30 small kernels (softmax, sort, gather, bincount, a stable
sort for queue positions, scatters, the two losses). At decode sizes each costs launch latency,
not bandwidth, and together they cost more than streaming the experts' weights. DeepSpeed-MoE's
answer was a fused gating kernel that builds the token→slot mapping table directly; this is ours.

Launches (after the router GEMM, which stays in torch so logits match the reference bit for bit):
  1. `_topk_kernel`, one program per block of tokens: finite-ize logits, scores (softmax/sigmoid),
     choices by repeated arg-max (ties → lower expert index) over what the reference's
     `select_experts` ranks by: the probabilities for the first choice and the logits (+ Gumbel
     noise) for later ones (DeepSpeed), logits + noise for every choice ("rsample"), or the
     scores + expert bias within the best groups (DeepSeek); weights (scaled; normalised here when
     nothing can be dropped), logsumexp for the z-loss and per-block column sums of the balance
     probabilities.
  2. `_queue_kernel`: each assignment's position in its expert's queue in priority order
     (choice-major, tokens in position or RTS order) = a stable counting sort. Small inputs: one
     program walks all blocks carrying the running per-expert counts (no extra launch). Large
     inputs: a histogram pass, a prefix sum over blocks (`_scan_kernel`), then the slot pass,
     each block independent.
  3. `_finalize_kernel`, one program: counts after dropping = min(count, capacity), the number
     dropped, aux and z losses (f_e from the first choices' counts when the config says so,
     counted by one torch scatter). With capacity, renormalising the kept weights (DeepSpeed's
     top-2) needs every route's kept flag, so it runs after the queue pass, in torch.
Dropless routing without a statistics reduction (serving prefill, dropless training on one
rank) takes three launches instead: the top-k kernel also stores each block's count per
(choice, expert); `_dropless_scan_kernel` (a program per choice and column tile of experts)
turns them into prefix sums down the blocks and per-choice totals, and shares out the sums the
losses need; `_dropless_plan_kernel` (a program per token block) gives each assignment its queue
slot and, nothing being dropped, its expert-sorted row start[e] + slot — the dispatch plan
(`routing.order`, used when no backward follows), so the layer needs no planning launch.
Under data parallelism the balance counts are summed over the ranks (the router's
`stats_reduce`, one all-reduce of E counts) between the queue pass and `_finalize_kernel`; the
kernels take f_e's denominator from the counts they are given, so the fused aux loss is the
global batch's, as in the reference path.
Backward (`_route_bwd_kernel`, launched by route_logits_grad) recomputes scores from the logits
and returns d logits for the weights, the aux loss and the z-loss in one pass, so the router
trains through this path; it is also the backward of the one-launch router
(moeflow.ops.decode_route_triton), which routes training calls of a few tokens.
The kernels after the choice (queue, scans, finalize, the dropless plan) live in
moeflow.ops.routing_slots_triton; this module chooses, launches them, and holds the backward.

Ids, slots, kept and counts equal the reference exactly (same arithmetic on the same fp32
logits); weights and losses agree to fp32 rounding (the exponentials differ in the last bits).

Legend: T tokens, E experts, K top-k, N = T·K assignments, G expert groups, NB blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moeflow.config import RouterConfig
from moeflow.model.router import (ExpertOrder, RoutingResult, StatsReduce, count_ids,
                                  detach_unused, selects_by_logits)
from moeflow.ops.backend import records_grad
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.routing_slots_triton import (_dropless_plan_kernel, _dropless_scan_kernel,
                                              _finalize_kernel, _queue_kernel, _scan_kernel)

_FP32_MAX = 3.4028234663852886e38
_SERIAL_LIMIT = 1024  # assignments handled by one program walking all blocks (≈ 16 blocks)
_SCAN_TILE = 8192  # entries of the dropless scan's [blocks, experts] tiles (one step ≤ 256 blocks)


def scan_warps(block_r: int, block_c: int) -> int:
    """Warps of the dropless scan's program: 8 once its tile holds more than 4096 entries.
    ptxas (sm_90, benchmarks/kernel_resources.py) at the 2048-token prefill's 256 × 32 tile:
    4 warps 255 registers and 156 bytes of spills per thread, 8 warps 178 and none."""
    return 8 if block_r * block_c > 4096 else 4


@triton.jit
def finite_logits(x):
    x = tl.where(x != x, -3.4028234663852886e38, x)
    return tl.minimum(tl.maximum(x, -3.4028234663852886e38), 3.4028234663852886e38)


@triton.jit
def _scores(x, cmask, SOFTMAX: tl.constexpr):
    """Returns (scores, balance probabilities, logsumexp, softmax) for a [BT, BE] logits tile."""
    xm = tl.where(cmask[None, :], x, float("-inf"))
    mx = tl.max(xm, axis=1)
    ex = tl.exp(xm - mx[:, None])
    den = tl.sum(ex, axis=1)
    soft = ex / den[:, None]
    lse = mx + tl.log(den)
    if SOFTMAX:
        scores = soft
        probs = soft
    else:
        scores = tl.where(cmask[None, :], tl.sigmoid(x), 0.0)
        probs = scores / tl.maximum(tl.sum(scores, axis=1), 1e-20)[:, None]
    return scores, probs, lse, soft


_NORM_EPS = 1.1920928955078125e-07  # fp32 eps, DeepSpeed's clamp of a token's weight sum
SEL_SCORES, SEL_NOISY_LOGITS, SEL_DEEPSPEED = 0, 1, 2


@triton.jit
def _first_largest(v1, i1, s1, v2, i2, s2):
    """tl.reduce's combine for top-k: of two (value, column, score) candidates the larger
    value, the lower column on a tie."""
    left = (v1 > v2) | ((v1 == v2) & (i1 < i2))
    return tl.where(left, v1, v2), tl.where(left, i1, i2), tl.where(left, s1, s2)


@triton.jit
def choose_tile(x, xr, bias_ptr, rows, cols, cmask, E, routed_scaling,
                K: tl.constexpr, SOFTMAX: tl.constexpr, SEL: tl.constexpr,
                HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, GROUPS: tl.constexpr,
                TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """The choices of a [BLOCK_T, BLOCK_E] tile of finite logits `x` (`xr`: with noise, or `x`):
    returns (ids [BLOCK_T, BLOCK_K], weights (scaled; normalised if NORMALIZE), logsumexp,
    balance probabilities, chosen [BLOCK_T, BLOCK_E] = the experts each row picked).
    Shared by `_topk_kernel` and moeflow.ops.decode_route_triton, so both choose alike."""
    scores, probs, lse, soft = _scores(x, cmask, SOFTMAX)
    if SEL == 1:
        sel = xr
    else:
        sel = scores
    if HAS_BIAS:
        sel = sel + tl.load(bias_ptr + cols, mask=cmask, other=0.0)[None, :]

    if GROUPS > 1:
        per_group = E // GROUPS
        gid = cols // per_group
        gcols = tl.arange(0, BLOCK_G)
        gscore = tl.full([BLOCK_T, BLOCK_G], float("-inf"), tl.float32)
        for g in tl.static_range(GROUPS):
            v = tl.where(((gid == g) & cmask)[None, :], sel, float("-inf"))
            m1 = tl.max(v, axis=1)
            s = m1
            if GROUP_TOP2:
                i1 = tl.min(tl.where(v == m1[:, None], cols[None, :], BLOCK_E), axis=1)
                v2 = tl.where(cols[None, :] == i1[:, None], float("-inf"), v)
                s = m1 + tl.max(v2, axis=1)
            gscore = tl.where(gcols[None, :] == g, s[:, None], gscore)
        gtaken = (gcols >= GROUPS)[None, :] & (rows >= 0)[:, None]
        for _ in tl.static_range(TOPK_GROUPS):
            cand = tl.where(gtaken, float("-inf"), gscore)
            m = tl.max(cand, axis=1)
            gi = tl.min(tl.where((cand == m[:, None]) & ~gtaken, gcols[None, :], BLOCK_G), axis=1)
            gtaken = gtaken | (gcols[None, :] == gi[:, None])
        keep = (cols < 0)[None, :] & (rows >= 0)[:, None]
        for g in tl.static_range(GROUPS):
            chosen = tl.max(tl.where(gcols[None, :] == g, gtaken.to(tl.int32), 0), axis=1) > 0
            keep = keep | ((gid == g)[None, :] & chosen[:, None])
        sel = tl.where(keep, sel, float("-inf"))

    kcols = tl.arange(0, BLOCK_K)
    taken = (~cmask)[None, :] & (rows >= 0)[:, None]
    ids_tile = tl.zeros([BLOCK_T, BLOCK_K], tl.int64)
    w_tile = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    for k in tl.static_range(K):
        if SEL == 2:
            if k == 0:
                cand = tl.where(taken, float("-inf"), soft)
            else:
                cand = tl.where(taken, float("-inf"), xr)
        else:
            cand = tl.where(taken, float("-inf"), sel)
        # One reduction per round: the largest candidate (the lowest column among equals)
        # and its score. Taken columns are -inf and every round has a finite one left (the
        # config keeps top_k ≤ topk_groups × experts per group), so a taken one never wins.
        _, idx, w = tl.reduce((cand, tl.broadcast_to(cols[None, :], cand.shape), scores),
                              axis=1, combine_fn=_first_largest)
        hit = cols[None, :] == idx[:, None]
        taken = taken | hit
        ids_tile = tl.where(kcols[None, :] == k, idx.to(tl.int64)[:, None], ids_tile)
        w_tile = tl.where(kcols[None, :] == k, w[:, None], w_tile)
    if NORMALIZE:
        w_tile = w_tile / tl.maximum(tl.sum(w_tile, axis=1), 1.1920928955078125e-07)[:, None]
    w_tile = w_tile * routed_scaling
    return ids_tile, w_tile, lse, probs, taken & cmask[None, :]


@triton.jit
def _topk_kernel(logits_ptr, noise_ptr, bias_ptr, ids_ptr, w_ptr, lse_ptr, psum_ptr, hist_ptr,
                 T, E, NB, routed_scaling,
                 K: tl.constexpr, SOFTMAX: tl.constexpr, SEL: tl.constexpr,
                 HAS_NOISE: tl.constexpr, HIST: tl.constexpr,
                 HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, GROUPS: tl.constexpr,
                 TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr,
                 BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    x = finite_logits(tl.load(logits_ptr + offs, mask=m2, other=0.0))
    xr = x
    if HAS_NOISE:
        xr = x + tl.load(noise_ptr + offs, mask=m2, other=0.0)
    ids_tile, w_tile, lse, probs, _ = choose_tile(
        x, xr, bias_ptr, rows, cols, cmask, E, routed_scaling, K, SOFTMAX, SEL, HAS_BIAS,
        NORMALIZE, GROUPS, TOPK_GROUPS, GROUP_TOP2, BLOCK_T, BLOCK_E, BLOCK_G, BLOCK_K)
    kcols = tl.arange(0, BLOCK_K)
    kmask = rmask[:, None] & (kcols < K)[None, :]
    koffs = rows[:, None].to(tl.int64) * K + kcols[None, :]
    tl.store(ids_ptr + koffs, ids_tile, mask=kmask)
    tl.store(w_ptr + koffs, w_tile, mask=kmask)
    tl.store(lse_ptr + rows, lse, mask=rmask)
    tl.store(psum_ptr + pid * E + cols, tl.sum(tl.where(m2, probs, 0.0), axis=0), mask=cmask)
    if HIST:  # this block's count per (choice, expert), hist[k, pid, e], in one [K, E] store
        hit = (ids_tile.to(tl.int32)[:, :, None] == cols[None, None, :]) & kmask[:, :, None]
        tl.store(hist_ptr + (kcols[:, None] * NB + pid) * E + cols[None, :],
                 tl.sum(hit.to(tl.int32), axis=0), mask=(kcols < K)[:, None] & cmask[None, :])



@triton.jit
def _route_bwd_kernel(logits_ptr, ids_ptr, kept_ptr, gw_ptr, gloss_ptr, balance_ptr,
                      dlogits_ptr, T, E, routed_scaling, aux_coef, z_coef,
                      K: tl.constexpr, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
                      LOSS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """`LOSS_GRAD`: the losses have a gradient at gloss_ptr (else they are unused: zero)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    m2 = rmask[:, None] & cmask[None, :]
    raw = tl.load(logits_ptr + offs, mask=m2, other=0.0)
    x = finite_logits(raw)
    scores, probs, lse, soft = _scores(x, cmask, SOFTMAX)
    if LOSS_GRAD:
        g_total = tl.load(gloss_ptr + 2)
        g_aux = tl.load(gloss_ptr) + tl.where(aux_coef != 0.0, aux_coef * g_total, 0.0)
        g_z = tl.load(gloss_ptr + 1) + tl.where(z_coef != 0.0, z_coef * g_total, 0.0)
    else:
        g_aux = tl.full([], 0.0, tl.float32)
        g_z = tl.full([], 0.0, tl.float32)

    # d weights → d selected scores (through normalisation, scaling and the drop mask).
    s_sum = tl.zeros([BLOCK_T], tl.float32)
    gs_sum = tl.zeros([BLOCK_T], tl.float32)
    for k in tl.static_range(K):
        idx = tl.load(ids_ptr + rows * K + k, mask=rmask, other=0)
        s_k = tl.sum(tl.where(cols[None, :] == idx[:, None], scores, 0.0), axis=1)
        kept = tl.load(kept_ptr + rows * K + k, mask=rmask, other=0) != 0
        g_k = tl.where(kept, tl.load(gw_ptr + rows * K + k, mask=rmask, other=0.0), 0.0)
        g_k = g_k * routed_scaling
        s_sum += s_k
        gs_sum += g_k * s_k
    denom = tl.maximum(s_sum, 1.1920928955078125e-07)
    ds = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for k in tl.static_range(K):
        idx = tl.load(ids_ptr + rows * K + k, mask=rmask, other=0)
        kept = tl.load(kept_ptr + rows * K + k, mask=rmask, other=0) != 0
        g_k = tl.where(kept, tl.load(gw_ptr + rows * K + k, mask=rmask, other=0.0), 0.0)
        g_k = g_k * routed_scaling
        if NORMALIZE:
            g_k = g_k / denom - tl.where(s_sum >= 1.1920928955078125e-07,
                                         gs_sum / (denom * denom), 0.0)
        ds += tl.where(cols[None, :] == idx[:, None], g_k[:, None], 0.0)

    # aux = E/T · Σ_e f_e Σ_t probs_te, f_e = balance_e / Σ balance.
    balance_i = tl.load(balance_ptr + cols, mask=cmask, other=0)
    balance = balance_i.to(tl.float32)
    total = tl.maximum(tl.sum(balance_i), 1).to(tl.float32)
    dprobs = g_aux * E * balance / total / tl.maximum(T, 1)
    dprobs = tl.where(m2, dprobs[None, :] + tl.zeros([BLOCK_T, BLOCK_E], tl.float32), 0.0)
    if SOFTMAX:
        ds += dprobs
        dx = scores * (ds - tl.sum(ds * scores, axis=1)[:, None])
    else:
        q_raw = tl.sum(scores, axis=1)
        q = tl.maximum(q_raw, 1e-20)
        corr = tl.where(q_raw >= 1e-20, tl.sum(dprobs * scores, axis=1) / (q * q), 0.0)
        ds += dprobs / q[:, None] - corr[:, None]
        dx = ds * scores * (1.0 - scores)
    dz = tl.where(g_z != 0.0, g_z * 2.0 * lse / tl.maximum(T, 1), 0.0)  # lse may overflow
    dx += dz[:, None] * soft
    finite = (raw == raw) & (raw < float("inf")) & (raw > float("-inf"))
    tl.store(dlogits_ptr + offs, tl.where(finite, dx, 0.0), mask=m2)


def _block_t(E: int, T: int) -> int:
    """Tokens per routing program: a [BLOCK_T, E] tile of at most 4096 scores (larger tiles
    spill registers: 64 × 128 took 77 µs for one program on an H100), and few enough tokens that
    small batches still spread over the SMs instead of one program doing all the work."""
    cap = max(2, min(16, 4096 // next_power_of_2(E)))
    spread = next_power_of_2(max(1, cdiv(T, 264)))  # ≥ 2 programs per SM when T allows
    return max(2, min(cap, spread))


@dataclass(frozen=True)
class _Plan:
    """What one routing call computes, decided from the config and the call's arguments."""

    sel: int  # SEL_*: what the choices are ranked by
    normalize_in_kernel: bool  # renormalise in _topk_kernel (nothing can be dropped)
    normalize_after: bool  # renormalise the kept weights after the queue pass (torch)
    scaling: float  # routed_scaling applied in the kernel (1 when applied after)
    first_choice_balance: bool  # f_e from first choices only


def _plan(cfg: RouterConfig, capacity, expert_bias_E, noise_TE) -> _Plan:
    if noise_TE is not None and cfg.noise == "rsample":
        sel = SEL_NOISY_LOGITS
    elif selects_by_logits(cfg, expert_bias_E is not None):
        sel = SEL_DEEPSPEED
    else:
        sel = SEL_SCORES
    after = cfg.normalizes and capacity is not None
    return _Plan(sel=sel, normalize_in_kernel=cfg.normalizes and capacity is None,
                 normalize_after=after, scaling=1.0 if after else float(cfg.routed_scaling),
                 first_choice_balance=cfg.balance_on_first_choice)


class _Routed(NamedTuple):
    """What the forward kernels give (a NamedTuple: named, and as cheap to build as a tuple on
    the host path of a small eager call)."""

    ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor  # bool
    slots_TK: torch.Tensor
    counts_E: torch.Tensor
    num_dropped: torch.Tensor
    losses: torch.Tensor  # [3]: aux, z, their weighted sum
    balance_E: torch.Tensor  # the counts the balance loss used (its backward reads them)
    order: ExpertOrder | None  # the expert-sorted layout, where the kernels planned it


def _route_forward(logits_TE, cfg: RouterConfig, plan: _Plan, capacity, expert_bias_E, noise_TE,
                   order_T, stats_reduce) -> _Routed:
    T, E = logits_TE.shape
    K = cfg.top_k
    dev = logits_TE.device
    block_e = next_power_of_2(E)
    dropless = capacity is None and stats_reduce is None and T > 0
    block_t = _block_t(E, T)
    if dropless:  # the histogram's [BLOCK_T, K, E] tile: at most 8192 entries
        block_t = min(block_t, max(2, 8192 // (next_power_of_2(K) * block_e)))
    nb = cdiv(T, block_t)
    ids_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    w_TK = torch.empty(T, K, dtype=torch.float32, device=dev)
    lse_T = torch.empty(T, dtype=torch.float32, device=dev)
    psum = torch.empty(max(nb, 1), E, dtype=torch.float32, device=dev)
    hist = torch.empty(K, nb, E, dtype=torch.int32, device=dev) if dropless else psum
    if T > 0:
        _topk_kernel[(nb,)](
            logits_TE, noise_TE if noise_TE is not None else logits_TE,
            expert_bias_E if expert_bias_E is not None else logits_TE,
            ids_TK, w_TK, lse_T, psum, hist, T, E, nb, plan.scaling,
            K=K, SOFTMAX=cfg.score_func == "softmax", SEL=plan.sel,
            HAS_NOISE=noise_TE is not None, HIST=dropless,
            HAS_BIAS=expert_bias_E is not None, NORMALIZE=plan.normalize_in_kernel,
            GROUPS=cfg.num_groups, TOPK_GROUPS=cfg.topk_groups,
            GROUP_TOP2=E // cfg.num_groups >= 2, BLOCK_T=block_t, BLOCK_E=block_e,
            BLOCK_G=next_power_of_2(cfg.num_groups),
            BLOCK_K=next_power_of_2(K), num_warps=4)
    else:
        psum.zero_()
    if dropless:
        return _plan_dropless(ids_TK, w_TK, hist, psum, lse_T, cfg, plan, block_t)

    N = T * K
    cap = N + 1 if capacity is None else capacity
    slots_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    kept_u8 = torch.empty(T, K, dtype=torch.int8, device=dev)
    # The queue kernel (one program) or the scan writes every count; nothing does for N = 0.
    counts_before = (torch.zeros if N == 0 else torch.empty)(E, dtype=torch.int64, device=dev)
    block_p = max(16, min(128, 8192 // block_e))
    order = order_T if order_T is not None else ids_TK
    common = dict(K=K, HAS_ORDER=order_T is not None, BLOCK_P=block_p, BLOCK_E=block_e)
    if 0 < N <= _SERIAL_LIMIT:
        _queue_kernel[(1,)](ids_TK, order, w_TK, slots_TK, kept_u8, counts_before, counts_before,
                            counts_before, T, E, N, cap, MODE=0, num_warps=4, **common)
    elif N > 0:
        npb = cdiv(N, block_p)
        hist = torch.empty(npb, E, dtype=torch.int32, device=dev)
        _queue_kernel[(npb,)](ids_TK, order, w_TK, slots_TK, kept_u8, hist, hist,
                              counts_before, T, E, N, cap, MODE=1, num_warps=4, **common)
        offsets = torch.empty_like(hist)
        block_c = min(block_e, 32)
        _scan_kernel[(cdiv(E, block_c),)](hist, offsets, counts_before, npb, E,
                                                 BLOCK_R=64, BLOCK_C=block_c, num_warps=4)
        _queue_kernel[(npb,)](ids_TK, order, w_TK, slots_TK, kept_u8, offsets, hist,
                              counts_before, T, E, N, cap, MODE=2, num_warps=4, **common)

    counts_E = torch.empty(E, dtype=torch.int64, device=dev)
    num_dropped = torch.empty((), dtype=torch.int64, device=dev)
    losses = torch.empty(3, dtype=torch.float32, device=dev)
    balance = count_ids(ids_TK[:, 0], E) if plan.first_choice_balance else counts_before
    if stats_reduce is not None:
        balance = stats_reduce(balance)  # a new tensor: counts_before stays this rank's
    _finalize_kernel[(1,)](counts_before, balance, psum, lse_T, counts_E, num_dropped, losses,
                           T, E, max(nb, 1) if T > 0 else 1, cap, float(cfg.aux_loss_coef),
                           float(cfg.z_loss_coef), K=K, BLOCK_E=block_e, BLOCK_T=1024,
                           BLOCK_B=max(1, min(256, 16384 // block_e)), num_warps=8)
    return _Routed(ids_TK, w_TK, kept_u8.view(torch.bool), slots_TK, counts_E, num_dropped,
                   losses, balance, None)


def _plan_dropless(ids_TK, w_TK, hist, psum, lse_T, cfg: RouterConfig, plan: _Plan,
                   block_t: int) -> _Routed:
    """Dropless routing without a statistics reduction: the queue slots, counts, losses and the
    expert-sorted layout from the top-k kernel's per-choice block histograms in two launches
    (the capacity path needs five: histogram, scan, slots, finalize, then the dispatch's plan)."""
    K, nb, E = hist.shape
    T = ids_TK.shape[0]
    dev = ids_TK.device
    block_c = min(next_power_of_2(E), 32)
    tiles = cdiv(E, block_c)
    offsets = torch.empty_like(hist)
    totals = torch.empty(K, E, dtype=torch.int32, device=dev)
    pe_part = torch.empty(K, E, dtype=torch.float32, device=dev)
    z_part = torch.empty(K * tiles, dtype=torch.float32, device=dev)
    block_r = min(next_power_of_2(nb), max(16, _SCAN_TILE // block_c))
    _dropless_scan_kernel[(K, tiles)](hist, offsets, totals, psum, lse_T, pe_part, z_part, T, E,
                                      nb, K=K, BLOCK_R=block_r, BLOCK_C=block_c, BLOCK_Z=256,
                                      num_warps=scan_warps(block_r, block_c))
    slots_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    kept_u8 = torch.empty(T, K, dtype=torch.int8, device=dev)
    row_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    token_N = torch.empty(T * K, dtype=torch.int64, device=dev)
    ends_E, counts_E, balance_E = (torch.empty(E, dtype=torch.int64, device=dev)
                                   for _ in range(3))
    num_dropped = torch.empty((), dtype=torch.int64, device=dev)
    losses = torch.empty(3, dtype=torch.float32, device=dev)
    _dropless_plan_kernel[(nb,)](
        ids_TK, hist, offsets, totals, pe_part, z_part, slots_TK, kept_u8, row_TK, token_N, ends_E,
        counts_E, balance_E, num_dropped, losses, T, E, nb, K * tiles, float(cfg.aux_loss_coef),
        float(cfg.z_loss_coef), K=K, FIRST_CHOICE_BALANCE=plan.first_choice_balance,
        BLOCK_T=block_t, BLOCK_E=next_power_of_2(E), BLOCK_K=next_power_of_2(K),
        BLOCK_Q=next_power_of_2(K * tiles), num_warps=4)
    return _Routed(ids_TK, w_TK, kept_u8.view(torch.bool), slots_TK, counts_E, num_dropped,
                   losses, balance_E, ExpertOrder(row_TK=row_TK, token_N=token_N, ends_E=ends_E))


class _FusedRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, cfg, plan, capacity, expert_bias_E, noise_TE, order_T,
                stats_reduce):
        r = _route_forward(logits_TE, cfg, plan, capacity, expert_bias_E, noise_TE, order_T,
                           stats_reduce)
        ctx.save_for_backward(logits_TE, r.ids_TK, r.kept_TK, r.balance_E)
        ctx.cfg, ctx.plan = cfg, plan
        ctx.mark_non_differentiable(r.ids_TK, r.kept_TK, r.slots_TK, r.counts_E, r.num_dropped)
        # Unused outputs' gradients stay None: autograd would fill a zero tensor for each of
        # the five integer outputs, one launch apiece in every backward (issue 14, small T).
        ctx.set_materialize_grads(False)
        return r.ids_TK, r.weights_TK, r.kept_TK, r.slots_TK, r.counts_E, r.num_dropped, r.losses

    @staticmethod
    def backward(ctx, g_ids, g_w, g_kept, g_slots, g_counts, g_dropped, g_losses):
        logits_TE, ids, kept, balance = ctx.saved_tensors
        d_logits = route_logits_grad(logits_TE, ids, kept.view(torch.int8), balance, g_w,
                                     g_losses, ctx.cfg, ctx.plan.normalize_in_kernel,
                                     ctx.plan.scaling)
        return d_logits, None, None, None, None, None, None, None


def route_logits_grad(logits_TE: torch.Tensor, ids_TK: torch.Tensor, kept_i8: torch.Tensor,
                      balance_E: torch.Tensor, g_w: torch.Tensor | None,
                      g_losses: torch.Tensor | None, cfg: RouterConfig, normalize: bool,
                      scaling: float) -> torch.Tensor | None:
    """The logits' gradient from the routing weights' and the losses' (either may be None:
    unused), in one launch: the backward of every Triton router (this module's, and the
    one-launch moeflow.ops.decode_route_triton under autograd). `normalize`: the weights were
    renormalised in the kernel that chose them; `scaling`: the routed_scaling it applied;
    `balance_E`: the counts the balance loss used (read only when the losses have a
    gradient)."""
    if g_w is None and g_losses is None:
        return None
    T, E = logits_TE.shape
    if g_w is None:
        g_w = logits_TE.new_zeros(ids_TK.shape)
    d_logits = torch.empty_like(logits_TE)
    if T > 0:
        block_t = _block_t(E, T)
        loss_grad = g_losses is not None
        _route_bwd_kernel[(cdiv(T, block_t),)](
            logits_TE, ids_TK, kept_i8, g_w.contiguous(),
            g_losses.contiguous() if loss_grad else g_w, balance_E, d_logits, T, E, scaling,
            float(cfg.aux_loss_coef), float(cfg.z_loss_coef), K=cfg.top_k,
            SOFTMAX=cfg.score_func == "softmax", NORMALIZE=normalize, LOSS_GRAD=loss_grad,
            BLOCK_T=block_t, BLOCK_E=next_power_of_2(E), num_warps=4)
    return d_logits


def route_triton(logits_TE: torch.Tensor, cfg: RouterConfig, capacity: int | None,
                 expert_bias_E: torch.Tensor | None, noise_TE: torch.Tensor | None,
                 order_T: torch.Tensor | None, stats_reduce: StatsReduce | None = None
                 ) -> RoutingResult:
    """Same contract and result as `moeflow.model.router.route_reference`."""
    logits_TE = logits_TE.contiguous()
    if noise_TE is not None:
        noise_TE = noise_TE.contiguous()
    plan = _plan(cfg, capacity, expert_bias_E, noise_TE)
    order = None
    if records_grad(logits_TE):
        ids, w, kept, slots, counts, dropped, losses = _FusedRoute.apply(
            logits_TE, cfg, plan, capacity, expert_bias_E, noise_TE, order_T, stats_reduce)
    else:  # no backward: the dropless path's layout goes to the dispatcher (routing.order)
        r = _route_forward(logits_TE, cfg, plan, capacity, expert_bias_E, noise_TE, order_T,
                           stats_reduce)
        ids, w, kept, slots, counts = r.ids_TK, r.weights_TK, r.kept_TK, r.slots_TK, r.counts_E
        dropped, losses, order = r.num_dropped, r.losses, r.order
    if plan.normalize_after:
        w = w / w.sum(-1, keepdim=True).clamp_min(_NORM_EPS) * cfg.routed_scaling
    aux_loss, z_loss = detach_unused(cfg, losses[0], losses[1])
    return RoutingResult(ids_TK=ids, weights_TK=w, kept_TK=kept, slots_TK=slots, counts_E=counts,
                         num_dropped=dropped, capacity=capacity, aux_loss=aux_loss,
                         z_loss=z_loss, loss=losses[2], order=order)


def routing_supported(logits_TE: torch.Tensor, cfg: RouterConfig) -> bool:
    """Shapes the fused kernel handles: fp32 logits, up to 1024 experts, equal groups."""
    E = logits_TE.shape[-1]
    return (logits_TE.dtype == torch.float32 and E <= 1024 and cfg.top_k <= E
            and E % cfg.num_groups == 0)
