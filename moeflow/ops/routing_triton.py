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
     top-2) needs every route's kept flag, so it runs after the queue pass, in torch, inside
     the autograd Function (the backward kernel differentiates it).
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
Backward: one launch (moeflow.ops.routing_grad_triton, shared with the one-launch router,
which routes training calls of up to 1024 assignments) recomputes the scores from the logits
and returns d logits for the weights, the aux loss and the z-loss, so the router trains through
this path. The per-token choice (`choose_tile`, the scores) lives in
moeflow.ops.routing_choice_triton, shared with the one-launch router; the kernels after the
choice (queue, scans, finalize, the dropless plan) in moeflow.ops.routing_slots_triton; this
module launches them and holds the autograd Function.

Ids, slots, kept and counts equal the reference exactly (same arithmetic on the same fp32
logits); weights and losses agree to fp32 rounding (the exponentials differ in the last bits).

Legend: T tokens, E experts, K top-k, N = T·K assignments, G expert groups, NB blocks.
"""

from __future__ import annotations

import functools
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
from moeflow.ops.routing_choice_triton import (SEL_DEEPSPEED, SEL_NOISY_LOGITS, SEL_SCORES,
                                               choose_tile, finite_logits, route_block_t,
                                               token_tile)
from moeflow.ops.routing_grad_triton import route_logits_grad
from moeflow.ops.routing_slots_triton import (_dropless_plan_kernel, _dropless_scan_kernel,
                                              _finalize_kernel, _queue_kernel, _scan_kernel)

_SERIAL_LIMIT = 1024  # assignments handled by one program walking all blocks (≈ 16 blocks)
_SCAN_TILE = 8192  # entries of the dropless scan's [blocks, experts] tiles (one step ≤ 256 blocks)


def scan_warps(block_r: int, block_c: int) -> int:
    """Warps of the dropless scan's program: 8 once its tile holds more than 4096 entries.
    ptxas (sm_90, benchmarks/kernel_resources.py) at the 2048-token prefill's 256 × 32 tile:
    4 warps 255 registers and 156 bytes of spills per thread, 8 warps 178 and none."""
    return 8 if block_r * block_c > 4096 else 4


_NORM_EPS = 1.1920928955078125e-07  # fp32 eps, DeepSpeed's clamp of a token's weight sum


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
    rows, cols, rmask, cmask, offs, m2 = token_tile(pid, T, E, BLOCK_T, BLOCK_E)
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



@dataclass(frozen=True)
class _Plan:
    """What one routing call computes, decided from the config and the call's arguments."""

    sel: int  # SEL_*: what the choices are ranked by
    normalize_in_kernel: bool  # renormalise in _topk_kernel (nothing can be dropped)
    normalize_after: bool  # renormalise the kept weights after the queue pass (torch, no grad)
    scaling: float  # routed_scaling applied in the kernel (1 when applied after)
    first_choice_balance: bool  # f_e from first choices only


@functools.lru_cache(maxsize=256)
def _plan(cfg: RouterConfig, capped: bool, has_bias: bool, noisy: bool) -> _Plan:
    """Cached: a function of the config and of what the call has (a capacity, an expert bias,
    Gumbel noise), asked on every eager layer call."""
    if noisy and cfg.noise == "rsample":
        sel = SEL_NOISY_LOGITS
    elif selects_by_logits(cfg, has_bias):
        sel = SEL_DEEPSPEED
    else:
        sel = SEL_SCORES
    after = cfg.normalizes and capped
    return _Plan(sel=sel, normalize_in_kernel=cfg.normalizes and not capped,
                 normalize_after=after, scaling=1.0 if after else float(cfg.routed_scaling),
                 first_choice_balance=cfg.balance_on_first_choice)


class _TopkTiles(NamedTuple):
    block_t: int  # tokens per program
    block_e: int
    nb: int  # programs (token blocks)
    block_g: int
    block_k: int


@functools.lru_cache(maxsize=1024)
def _topk_tiles(T: int, E: int, K: int, groups: int, dropless: bool) -> _TopkTiles:
    """The top-k kernel's tiles; on the dropless path its histogram's [BLOCK_T, K, E] tile
    holds at most 8192 entries. Cached per shape (asked on every eager layer call)."""
    block_e = next_power_of_2(E)
    block_t = route_block_t(E, T)
    if dropless:
        block_t = min(block_t, max(2, 8192 // (next_power_of_2(K) * block_e)))
    return _TopkTiles(block_t, block_e, cdiv(T, block_t), next_power_of_2(groups),
                      next_power_of_2(K))


class _DroplessTiles(NamedTuple):
    block_c: int  # the scan's expert columns per program
    tiles: int  # its programs per choice
    block_r: int  # its block rows per step
    warps: int
    block_e: int
    block_k: int
    block_q: int


@functools.lru_cache(maxsize=1024)
def _dropless_tiles(K: int, nb: int, E: int, scan_tile: int) -> _DroplessTiles:
    """The dropless scan's and plan's tiles over K choices × nb token blocks × E experts, the
    scan's tile at most `scan_tile` entries (_SCAN_TILE, passed so that a test that lowers it
    gets its own entry); cached per shape."""
    block_c = min(next_power_of_2(E), 32)
    tiles = cdiv(E, block_c)
    block_r = min(next_power_of_2(nb), max(16, scan_tile // block_c))
    return _DroplessTiles(block_c, tiles, block_r, scan_warps(block_r, block_c),
                          next_power_of_2(E), next_power_of_2(K), next_power_of_2(K * tiles))


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
    dropless = capacity is None and stats_reduce is None and T > 0
    block_t, block_e, nb, block_g, block_k = _topk_tiles(T, E, K, cfg.num_groups, dropless)
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
            BLOCK_G=block_g, BLOCK_K=block_k, num_warps=4)
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
    if plan.normalize_after:  # the kept routes' weights (no autograd: the backward kernel's)
        w_TK = w_TK / w_TK.sum(-1, keepdim=True).clamp_min(_NORM_EPS) * cfg.routed_scaling
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
    tile = _dropless_tiles(K, nb, E, _SCAN_TILE)
    offsets = torch.empty_like(hist)
    totals = torch.empty(K, E, dtype=torch.int32, device=dev)
    pe_part = torch.empty(K, E, dtype=torch.float32, device=dev)
    z_part = torch.empty(K * tile.tiles, dtype=torch.float32, device=dev)
    _dropless_scan_kernel[(K, tile.tiles)](
        hist, offsets, totals, psum, lse_T, pe_part, z_part, T, E, nb, K=K, BLOCK_R=tile.block_r,
        BLOCK_C=tile.block_c, BLOCK_Z=256, num_warps=tile.warps)
    slots_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    kept_u8 = torch.empty(T, K, dtype=torch.int8, device=dev)
    row_TK = torch.empty(T, K, dtype=torch.int64, device=dev)
    token_N = torch.empty(T * K, dtype=torch.int64, device=dev)
    ends_E = torch.empty(E, dtype=torch.int64, device=dev)
    counts_E = torch.empty(E, dtype=torch.int64, device=dev)
    balance_E = torch.empty(E, dtype=torch.int64, device=dev)
    num_dropped = torch.empty((), dtype=torch.int64, device=dev)
    losses = torch.empty(3, dtype=torch.float32, device=dev)
    _dropless_plan_kernel[(nb,)](
        ids_TK, hist, offsets, totals, pe_part, z_part, slots_TK, kept_u8, row_TK, token_N, ends_E,
        counts_E, balance_E, num_dropped, losses, T, E, nb, K * tile.tiles,
        float(cfg.aux_loss_coef), float(cfg.z_loss_coef), K=K,
        FIRST_CHOICE_BALANCE=plan.first_choice_balance, BLOCK_T=block_t, BLOCK_E=tile.block_e,
        BLOCK_K=tile.block_k, BLOCK_Q=tile.block_q, num_warps=4)
    return _Routed(ids_TK, w_TK, kept_u8.view(torch.bool), slots_TK, counts_E, num_dropped,
                   losses, balance_E, ExpertOrder(row_TK=row_TK, token_N=token_N, ends_E=ends_E))


class _FusedRoute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits_TE, cfg, plan, capacity, expert_bias_E, noise_TE, order_T,
                stats_reduce):
        r = _route_forward(logits_TE, cfg, plan, capacity, expert_bias_E, noise_TE, order_T,
                           stats_reduce)
        ctx.save_for_backward(logits_TE, r.ids_TK, r.kept_TK, r.balance_E)
        ctx.cfg = cfg
        ctx.mark_non_differentiable(r.ids_TK, r.kept_TK, r.slots_TK, r.counts_E, r.num_dropped)
        # Unused outputs' gradients stay None: autograd would fill a zero tensor for each of
        # the five integer outputs, one launch apiece in every backward (issue 14, small T).
        ctx.set_materialize_grads(False)
        return r.ids_TK, r.weights_TK, r.kept_TK, r.slots_TK, r.counts_E, r.num_dropped, r.losses

    @staticmethod
    def backward(ctx, g_ids, g_w, g_kept, g_slots, g_counts, g_dropped, g_losses):
        logits_TE, ids, kept, balance = ctx.saved_tensors
        d_logits = route_logits_grad(logits_TE, ids, kept.view(torch.int8), balance, g_w,
                                     g_losses, ctx.cfg)
        return d_logits, None, None, None, None, None, None, None


def route_triton(logits_TE: torch.Tensor, cfg: RouterConfig, capacity: int | None,
                 expert_bias_E: torch.Tensor | None, noise_TE: torch.Tensor | None,
                 order_T: torch.Tensor | None, stats_reduce: StatsReduce | None = None
                 ) -> RoutingResult:
    """Same contract and result as `moeflow.model.router.route_reference`."""
    logits_TE = logits_TE.contiguous()
    if noise_TE is not None:
        noise_TE = noise_TE.contiguous()
    plan = _plan(cfg, capacity is not None, expert_bias_E is not None, noise_TE is not None)
    order = None
    if records_grad(logits_TE):
        ids, w, kept, slots, counts, dropped, losses = _FusedRoute.apply(
            logits_TE, cfg, plan, capacity, expert_bias_E, noise_TE, order_T, stats_reduce)
    else:  # no backward: the dropless path's layout goes to the dispatcher (routing.order)
        r = _route_forward(logits_TE, cfg, plan, capacity, expert_bias_E, noise_TE, order_T,
                           stats_reduce)
        ids, w, kept, slots, counts = r.ids_TK, r.weights_TK, r.kept_TK, r.slots_TK, r.counts_E
        dropped, losses, order = r.num_dropped, r.losses, r.order
    aux_loss, z_loss = detach_unused(cfg, losses[0], losses[1])
    return RoutingResult(ids_TK=ids, weights_TK=w, kept_TK=kept, slots_TK=slots, counts_E=counts,
                         num_dropped=dropped, capacity=capacity, aux_loss=aux_loss,
                         z_loss=z_loss, loss=losses[2], order=order)


def routing_supported(logits_TE: torch.Tensor, cfg: RouterConfig) -> bool:
    """Shapes the fused kernel handles: fp32 logits, up to 1024 experts, equal groups."""
    E = logits_TE.shape[-1]
    return (logits_TE.dtype == torch.float32 and E <= 1024 and cfg.top_k <= E
            and E % cfg.num_groups == 0)
