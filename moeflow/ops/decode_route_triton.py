"""Decode routing on CUDA in one launch: logits → choices, weights, counts, losses and the
expert-sorted layout (the dispatch plan) together.

Why: at decode sizes (a few tokens) every launch costs ~2-3 µs of latency and almost no work.
The fused router (moeflow.ops.routing_triton) still takes four launches (top-k, queue, finalize,
plus a scatter for first-choice counts) and the Triton dispatch one more, so for a decode step of
the Qwen3-30B-A3B shape the MoE layer's bookkeeping outnumbered its two weight-streaming expert
kernels. For a few tokens the whole plan fits in one program, dropless or with a capacity
(DeepSpeed-MoE's top-1/top-2 gating evaluated with eval_capacity_factor, which took the
multi-kernel router and the Triton dispatch before): the choice pass accumulates
each expert's count; an assignment's queue slot in priority order decides whether it is kept
(slot < capacity; always, dropless); each expert keeps min(count, capacity) rows, so a kept
assignment's row is start[e] + slot with the starts the prefix sum of the clamped counts.
Dropped assignments are parked after the last expert's rows in (token, choice) order, where
sort_by_expert parks them: the experts never compute them and combine skips them (kept = 0,
weight 0). The capacity is a host-side int from T (RouterConfig.capacity), a kernel argument.
Random Token Selection (drop_policy "random") would need the RNG's token order and takes the
multi-kernel router. The gather of the token rows is left to the experts' up kernel
(moeflow.ops.grouped_mlp_triton, through `token_N`), so the layer runs: router GEMM, this
kernel, up, down, combine.

One program, two passes over the assignments (three with a capacity):
  1. blocks of tokens: finite logits → `choose_tile` (the same code as the fused router's
     top-k kernel: same choices, same weights bit for bit) → ids, weights; per-expert counts
     (all choices, and first choices for DeepSpeed's top-2 balance loss), the balance
     probabilities' column sums and Σ logsumexp² accumulate in registers;
  2. after a barrier, blocks of assignments in priority order (choice-major, then token, as
     the reference's queue: DeepSpeed's first choices before second choices): each
     assignment's queue slot (the assignments ahead of it with its expert: pairwise counts
     when all fit one tile, else a counting sort carrying the running per-expert counts);
     the kept ones get row = start[e] + slot and token_N[row] = their token;
  3. with a capacity, after another barrier, blocks of tokens in (token, choice) order: the
     dropped assignments' weights become 0 and, where the config normalises (DeepSpeed's
     top-2), each token's kept weights are renormalised and then scaled, as route_triton does
     in torch after its queue kernel (a token whose second route was dropped gives its first
     weight 1); a dropped assignment's row is Σ kept + its rank among the dropped in that
     order, and token_N[row] = its token.
Then counts (after dropping), ends (inclusive prefix sum), the losses (aux = E·Σ f_e·P_e with
f_e from the counts before dropping, z = mean lse², weighted as the reference weights them)
and num_dropped = Σ max(count − capacity, 0) are written, so the RoutingResult is the
reference's field for field (slots: the queue position, ≥ capacity where dropped) and the
DispatchPlan is sort_by_expert's, row for row (parked when there is a capacity).

moeflow.ops.decode_route_fused_triton runs the same passes in the launch that computes the
logits (router backend "triton_decode_fused"), and can leave pass 2 to the experts' kernel.

Training calls of up to TRAIN_ROUTE_MAX_ASSIGNMENTS (issue 14's small-T fwd+bwd cells, bound
by the host) take this launch too, with route_triton's backward kernel (_RouteWithGrad): one
launch instead of route_triton's three and the Triton dispatch's one, eleven allocations
instead of 23 (with the gather), and the layer gathers the planned rows by one index_select
(moeflow.model.dispatch).

Legend: T tokens, E experts, K top-k, N = T·K assignments.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from types import MappingProxyType

import torch
import triton
import triton.language as tl

from moeflow.config import RouterConfig
from moeflow.model.router import ExpertOrder, RoutingResult, count_ids, selects_by_logits
from moeflow.ops.backend import records_grad
from moeflow.ops.grid import next_power_of_2
from moeflow.ops.pdl import pdl_launch, wait_for_previous
from moeflow.ops.routing_slots_triton import store_losses
from moeflow.ops.routing_choice_triton import (SEL_DEEPSPEED, SEL_SCORES, choose_tile,
                                               finite_logits)
from moeflow.ops.routing_grad_triton import route_logits_grad


@triton.jit
def _place(slot, row, t, flat, valid, slots_ptr, kept_ptr, row_ptr, token_ptr, capacity,
           CAPPED: tl.constexpr):
    """Pass 2's stores for a block of assignments (priority-order positions `flat` in the
    [T, K] outputs): the queue slot, whether kept (CAPPED), the row and the row's token."""
    tl.store(slots_ptr + flat, slot.to(tl.int64), mask=valid)
    if CAPPED:
        kept = slot < capacity
        tl.store(kept_ptr + flat, kept.to(tl.int8), mask=valid)
        placed = valid & kept
    else:
        placed = valid
    tl.store(row_ptr + flat, row.to(tl.int64), mask=placed)
    tl.store(token_ptr + row, t.to(tl.int64), mask=placed)


@triton.jit
def choose_pass(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, t_lo, t_hi, E, pass1_scaling,
                K: tl.constexpr, SOFTMAX: tl.constexpr, SEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                NORMALIZE: tl.constexpr, GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                GROUP_TOP2: tl.constexpr, FIRST_BALANCE: tl.constexpr, CAPPED: tl.constexpr,
                BLOCK_T: tl.constexpr, FULL_E: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr, PEER_LOGITS: tl.constexpr):
    """Pass 1 over the tokens [t_lo, t_hi), in tiles of BLOCK_T: stores their ids and weights
    (and kept = 1, dropless) and returns (counts, first-choice counts, the balance
    probabilities' column sums, Σ lse²), each summed tile by tile in token order. FULL_E:
    E == BLOCK_E, so the logits load needs no column mask. PEER_LOGITS: other programs of this
    launch stored the logits: read through L2 (.cg), never from this SM's L1."""
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    kcols = tl.arange(0, BLOCK_K)
    counts = tl.zeros([BLOCK_E], tl.int32)
    first = tl.zeros([BLOCK_E], tl.int32)
    p_e = tl.zeros([BLOCK_E], tl.float32)
    z = tl.sum(tl.zeros([BLOCK_T], tl.float32), axis=0)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        rmask = rows < t_hi
        m2 = rmask[:, None] & cmask[None, :]
        if FULL_E:
            lmask = rmask[:, None]
        else:
            lmask = m2
        x = finite_logits(tl.load(logits_ptr + rows[:, None].to(tl.int64) * E + cols[None, :],
                                  mask=lmask, other=0.0,
                                  cache_modifier=".cg" if PEER_LOGITS else ""))
        ids_tile, w_tile, lse, probs, chosen = choose_tile(
            x, x, bias_ptr, rows, cols, cmask, E, pass1_scaling, K, SOFTMAX, SEL, HAS_BIAS,
            NORMALIZE, GROUPS, TOPK_GROUPS, GROUP_TOP2, BLOCK_T, BLOCK_E, BLOCK_G, BLOCK_K)
        kmask = rmask[:, None] & (kcols < K)[None, :]
        koffs = rows[:, None].to(tl.int64) * K + kcols[None, :]
        tl.store(ids_ptr + koffs, ids_tile, mask=kmask)
        tl.store(w_ptr + koffs, w_tile, mask=kmask)
        if not CAPPED:  # with a capacity, pass 2 stores whether each assignment was kept
            tl.store(kept_ptr + koffs, tl.full([BLOCK_T, BLOCK_K], 1, tl.int8), mask=kmask)
        counts += tl.sum((chosen & m2).to(tl.int32), axis=0)
        if FIRST_BALANCE:
            id0 = tl.sum(tl.where(kcols[None, :] == 0, ids_tile, 0), axis=1)
            first += tl.sum(((cols[None, :] == id0[:, None]) & m2).to(tl.int32), axis=0)
        p_e += tl.sum(tl.where(m2, probs, 0.0), axis=0)
        z += tl.sum(tl.where(rmask, lse * lse, 0.0), axis=0)
    return counts, first, p_e, z


@triton.jit
def plan_passes(counts, first, p_e, z, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr, ends_ptr,
                row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling, aux_coef, z_coef,
                capacity, K: tl.constexpr, FIRST_BALANCE: tl.constexpr, CAPPED: tl.constexpr,
                RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PAIRWISE: tl.constexpr,
                PLACE: tl.constexpr = True):
    """The passes after pass 1, from its sums over all T tokens (the ids and weights it
    stored are read back). PLACE False (dropless only): stop after the counts, ends and
    losses; the experts' kernel places the rows (slots, rows, token list; see
    route_decode_fused)."""
    cols = tl.arange(0, BLOCK_E)
    cmask = cols < E
    # Expert e keeps the first min(count, capacity) assignments of its queue.
    if CAPPED:
        kept_counts = tl.minimum(counts, capacity)
        tl.store(dropped_ptr, tl.sum(counts - kept_counts).to(tl.int64))
    else:
        kept_counts = counts
        tl.store(dropped_ptr + tl.arange(0, 1), tl.zeros([1], tl.int64))
    ends = tl.cumsum(kept_counts, axis=0)
    starts = ends - kept_counts
    tl.store(counts_ptr + cols, kept_counts.to(tl.int64), mask=cmask)
    tl.store(ends_ptr + cols, ends.to(tl.int64), mask=cmask)
    if FIRST_BALANCE:
        balance = first
    else:
        balance = counts
    store_losses(loss_ptr, balance, p_e, z, T, E, aux_coef, z_coef)

    if PLACE:
        _assign_rows(starts, kept_counts, ids_ptr, w_ptr, kept_ptr, slots_ptr, row_ptr,
                     token_ptr, T, E, routed_scaling, capacity, K, CAPPED, RENORMALIZE,
                     BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_P, PAIRWISE)


@triton.jit
def _assign_rows(starts, kept_counts, ids_ptr, w_ptr, kept_ptr, slots_ptr, row_ptr, token_ptr,
                 T, E, routed_scaling, capacity, K: tl.constexpr, CAPPED: tl.constexpr,
                 RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PAIRWISE: tl.constexpr):
    """Passes 2 and 3 (the module docstring): every assignment's queue slot and sorted row,
    the rows' tokens, and with a capacity the dropped assignments' weights and parked rows."""
    cols = tl.arange(0, BLOCK_E)
    kcols = tl.arange(0, BLOCK_K)
    # Pass 2 reads the ids pass 1 stored from other threads of this program (through L2).
    tl.debug_barrier()
    N = T * K
    if PAIRWISE:  # all N assignments in one tile: pairwise counts, no one-hot tile, no scan
        p = tl.arange(0, BLOCK_P)
        valid = p < N
        t = p % T
        flat = t.to(tl.int64) * K + p // T
        # Past N an id no expert has.
        e = tl.load(ids_ptr + flat, mask=valid, other=BLOCK_E, cache_modifier=".cg").to(tl.int32)
        # slot = #{assignments ahead in priority order with the same expert}; dropless,
        # row = #{assignments with a lower expert} + slot.
        ahead = ((e[None, :] == e[:, None]) & (p[None, :] < p[:, None])).to(tl.int32)
        if CAPPED:
            slot = tl.sum(ahead, axis=1)
            start = tl.sum(tl.where(e[:, None] == cols[None, :], starts[None, :], 0), axis=1)
            sorted_row = start + slot
        else:
            # Both counts from one reduction (the pairwise sums are most of this pass's time
            # at 128 assignments): the row in the low 16 bits, the slot above (each < 2^16).
            below = (e[None, :] < e[:, None]).to(tl.int32)
            both = tl.sum(below + ahead * 65537, axis=1)
            sorted_row = both & 0xFFFF
            slot = both >> 16
        _place(slot, sorted_row, t, flat, valid, slots_ptr, kept_ptr, row_ptr, token_ptr,
               capacity, CAPPED)
    else:  # blocks of BLOCK_P: a counting sort carrying the running per-expert counts
        running = tl.zeros([BLOCK_E], tl.int32)
        for p0 in range(0, N, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            valid = p < N
            t = p % T
            flat = t.to(tl.int64) * K + p // T
            e = tl.load(ids_ptr + flat, mask=valid, other=0, cache_modifier=".cg").to(tl.int32)
            onehot = ((e[:, None] == cols[None, :]) & valid[:, None]).to(tl.int32)
            rank = tl.sum(onehot * tl.cumsum(onehot, axis=0), axis=1) - 1
            slot = tl.sum(onehot * running[None, :], axis=1) + rank
            row = tl.sum(onehot * starts[None, :], axis=1) + slot
            _place(slot, row, t, flat, valid, slots_ptr, kept_ptr, row_ptr, token_ptr,
                   capacity, CAPPED)
            running += tl.sum(onehot, axis=0)

    if CAPPED:
        # Pass 3 reads the kept flags pass 2 stored and the weights pass 1 stored.
        tl.debug_barrier()
        next_parked = tl.sum(kept_counts)  # dropped rows follow the last expert's, (t, k) order
        for t0 in range(0, T, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            kmask = (rows < T)[:, None] & (kcols < K)[None, :]
            koffs = rows[:, None].to(tl.int64) * K + kcols[None, :]
            kept = tl.load(kept_ptr + koffs, mask=kmask, other=0, cache_modifier=".cg") != 0
            w = tl.load(w_ptr + koffs, mask=kmask, other=0.0, cache_modifier=".cg")
            w = tl.where(kept, w, 0.0)
            if RENORMALIZE:
                w = w / tl.maximum(tl.sum(w, axis=1), 1.1920928955078125e-07)[:, None]
                w = w * routed_scaling
            tl.store(w_ptr + koffs, w, mask=kmask)
            drop = (kmask & ~kept).to(tl.int32)
            drop_t = tl.sum(drop, axis=1)
            rank = (tl.cumsum(drop_t, axis=0) - drop_t)[:, None] + tl.cumsum(drop, axis=1) - drop
            row = next_parked + rank
            token = rows[:, None] + kcols[None, :] * 0
            tl.store(row_ptr + koffs, row.to(tl.int64), mask=drop != 0)
            tl.store(token_ptr + row, token.to(tl.int64), mask=drop != 0)
            next_parked += tl.sum(drop_t)


@triton.jit
def route_plan(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr, ends_ptr,
               row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling, aux_coef,
               z_coef, capacity, K: tl.constexpr, SOFTMAX: tl.constexpr, SEL: tl.constexpr,
               HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, GROUPS: tl.constexpr,
               TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr, FIRST_BALANCE: tl.constexpr,
               CAPPED: tl.constexpr, RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
               FULL_E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, PAIRWISE: tl.constexpr,
               PEER_LOGITS: tl.constexpr, PLACE: tl.constexpr = True):
    """The passes of the module docstring, run by one program over the finite logits at
    `logits_ptr` ([T, E] fp32). PEER_LOGITS: other programs of the same launch wrote them
    (the fused-logits kernel), so the loads must not be served from this SM's L1. CAPPED:
    each expert keeps its first `capacity` assignments (pass 3 runs); NORMALIZE: pass 1
    normalises the weights (dropless only); RENORMALIZE: pass 3 normalises the kept ones."""
    counts, first, p_e, z = choose_pass(
        logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, 0, T, E,
        pass1_scaling(routed_scaling, RENORMALIZE), K, SOFTMAX, SEL, HAS_BIAS, NORMALIZE,
        GROUPS, TOPK_GROUPS, GROUP_TOP2, FIRST_BALANCE, CAPPED, BLOCK_T, FULL_E, BLOCK_E,
        BLOCK_G, BLOCK_K, PEER_LOGITS)
    plan_passes(counts, first, p_e, z, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr, ends_ptr,
                row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling, aux_coef, z_coef,
                capacity, K, FIRST_BALANCE, CAPPED, RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_P,
                PAIRWISE, PLACE)


@triton.jit
def pass1_scaling(routed_scaling, RENORMALIZE: tl.constexpr):
    """With a renormalisation over the kept routes (pass 3) the scaling follows it."""
    if RENORMALIZE:
        return 1.0
    else:
        return routed_scaling


@triton.jit
def _decode_route_kernel(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr,
                         ends_ptr, row_ptr, token_ptr, dropped_ptr, loss_ptr,
                         T, E, routed_scaling, aux_coef, z_coef, capacity,
                         K: tl.constexpr, SOFTMAX: tl.constexpr, SEL: tl.constexpr,
                         HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr, GROUPS: tl.constexpr,
                         TOPK_GROUPS: tl.constexpr, GROUP_TOP2: tl.constexpr,
                         FIRST_BALANCE: tl.constexpr, CAPPED: tl.constexpr,
                         RENORMALIZE: tl.constexpr, BLOCK_T: tl.constexpr,
                         FULL_E: tl.constexpr,
                         BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
                         BLOCK_P: tl.constexpr, PAIRWISE: tl.constexpr, PDL: tl.constexpr):
    wait_for_previous(PDL)
    route_plan(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr, ends_ptr,
               row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling, aux_coef,
               z_coef, capacity, K, SOFTMAX, SEL, HAS_BIAS, NORMALIZE, GROUPS, TOPK_GROUPS,
               GROUP_TOP2, FIRST_BALANCE, CAPPED, RENORMALIZE, BLOCK_T, FULL_E, BLOCK_E,
               BLOCK_G, BLOCK_K, BLOCK_P, PAIRWISE, False)


# Warps of the one-program kernel (the logits given): the 8 session 13 measured for it.
ONE_PROGRAM_WARPS = 8


def route_outputs(T: int, E: int, K: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """The kernels' outputs, in their argument order (ids … losses); torch.empty written out
    ten times: a helper would add ten Python calls to every eager layer call."""
    i64, f32, empty = torch.int64, torch.float32, torch.empty
    return {"ids": empty(T, K, dtype=i64, device=dev),
            "weights": empty(T, K, dtype=f32, device=dev),
            "kept": empty(T, K, dtype=torch.int8, device=dev),
            "slots": empty(T, K, dtype=i64, device=dev),
            "counts": empty(E, dtype=i64, device=dev),
            "ends": empty(E, dtype=i64, device=dev),
            "rows": empty(T, K, dtype=i64, device=dev),
            "tokens": empty(T * K, dtype=i64, device=dev),
            "dropped": empty((), dtype=i64, device=dev),
            "losses": empty(3, dtype=f32, device=dev)}


@functools.lru_cache(maxsize=1024)
def route_args(cfg: RouterConfig, T: int, E: int, has_bias: bool, capacity: int | None
               ) -> tuple[tuple, Mapping]:
    """The routing passes' scalar arguments (routed_scaling, aux_coef, z_coef, capacity) and
    constexprs (the launch's warps are the caller's: ONE_PROGRAM_WARPS here, the fused
    kernel's route_warps). Cached: a function of its arguments, asked on every decode layer
    call (read-only: shared between calls)."""
    K = cfg.top_k
    block_e = next_power_of_2(E)
    sel = SEL_DEEPSPEED if selects_by_logits(cfg, has_bias) else SEL_SCORES
    capped = capacity is not None
    n = T * K
    block_p = max(16, next_power_of_2(max(n, 1)))
    pairwise = n <= 128 and (not capped or block_p * block_e <= 8192)
    if not pairwise:
        block_p = max(16, min(128, 8192 // block_e, block_p))
    # Dropless, the capacity is unused: one constant, so it adds no specialisation (Triton
    # compiles a variant per int argument that is 1 or a multiple of 16).
    scalars = (float(cfg.routed_scaling), float(cfg.aux_loss_coef), float(cfg.z_loss_coef),
               capacity if capped else 0)
    return scalars, MappingProxyType(dict(
        K=K, SOFTMAX=cfg.score_func == "softmax", SEL=sel, HAS_BIAS=has_bias,
        NORMALIZE=cfg.normalizes and not capped, GROUPS=cfg.num_groups,
        TOPK_GROUPS=cfg.topk_groups, GROUP_TOP2=E // cfg.num_groups >= 2,
        FIRST_BALANCE=cfg.balance_on_first_choice and K > 1,
        CAPPED=capped, RENORMALIZE=cfg.normalizes and capped,
        # Tiles of at most 4 tokens (choice_rows; 16 until session 17) and 2048 scores (with
        # 16-token tiles, 4 warps or 4096-score tiles had spilled up to 900 bytes). Pass 2:
        # all T·K assignments in one [BLOCK_P, BLOCK_P] pairwise tile up to 128 of them (H200,
        # plan program alone, Qwen3 router, T·K 128: 14.7 µs, 20.4 with the one-hot sort; all
        # pairs over tiles at T·K 512 took 107 µs against its 77), else one-hot tiles of at
        # most 8192 entries; with a capacity the starts' look-up is [BLOCK_P, BLOCK_E] too.
        BLOCK_T=choice_rows(T, E), FULL_E=E == block_e,
        BLOCK_E=block_e, BLOCK_G=next_power_of_2(cfg.num_groups),
        BLOCK_K=next_power_of_2(K),
        BLOCK_P=block_p, PAIRWISE=pairwise))


def choice_rows(T: int, E: int) -> int:
    """Tokens per pass-1 tile (at most 2048 scores), also the fused kernel's token block: its
    blocks' programs choose their own tokens' experts with the tiles one program would use, so
    both kernels choose, and sum the balance terms, alike."""
    return max(2, min(next_power_of_2(max(T, 1)), 4,
                      2048 // next_power_of_2(E)))


def routing_result(out: dict[str, torch.Tensor], capacity: int | None, placed: bool = True
                   ) -> RoutingResult:
    losses = out["losses"]
    return RoutingResult(ids_TK=out["ids"], weights_TK=out["weights"],
                         kept_TK=out["kept"].view(torch.bool), slots_TK=out["slots"],
                         counts_E=out["counts"], num_dropped=out["dropped"], capacity=capacity,
                         aux_loss=losses[0], z_loss=losses[1], loss=losses[2],
                         order=ExpertOrder(row_TK=out["rows"], token_N=out["tokens"],
                                           ends_E=out["ends"], placed=placed))


def _launch(logits_TE: torch.Tensor, cfg: RouterConfig, expert_bias_E: torch.Tensor | None,
            capacity: int | None, out: dict[str, torch.Tensor]) -> None:
    """One _decode_route_kernel launch over contiguous logits into route_outputs' `out`."""
    T, E = logits_TE.shape
    scalars, meta = route_args(cfg, T, E, expert_bias_E is not None, capacity)
    _decode_route_kernel[(1,)](
        logits_TE, expert_bias_E if expert_bias_E is not None else logits_TE, *out.values(),
        T, E, *scalars, **meta, num_warps=ONE_PROGRAM_WARPS, **pdl_launch(logits_TE))


class _RouteWithGrad(torch.autograd.Function):
    """The one launch under autograd (training calls of at most TRAIN_ROUTE_MAX_ASSIGNMENTS
    assignments: three launches fewer than route_triton plus the Triton dispatch, and half the
    allocations). Its outputs are the weights and the losses; the integer outputs are written
    into the caller's buffers (`out`), which autograd need not track (each output of an
    apply costs host time). The backward is route_triton's kernel, given what it reads: the
    choices, the kept flags and the balance counts. Those are the counts the kernel writes when
    routing is dropless and the balance loss counts every choice; else (first choices only,
    or counts before a capacity's drops) the backward counts them, and only when the losses
    have a gradient."""

    @staticmethod
    def forward(ctx, logits_TE, cfg, expert_bias_E, capacity, out):
        _launch(logits_TE, cfg, expert_bias_E, capacity, out)
        ctx.save_for_backward(logits_TE, out["ids"], out["kept"], out["counts"])
        ctx.cfg, ctx.capped = cfg, capacity is not None
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return out["weights"], out["losses"]

    @staticmethod
    def backward(ctx, g_w, g_losses):
        logits_TE, ids_TK, kept_i8, balance_E = ctx.saved_tensors
        cfg = ctx.cfg
        first = cfg.balance_on_first_choice and cfg.top_k > 1
        if g_losses is not None and (first or ctx.capped):
            balance_E = count_ids(ids_TK[:, 0] if first else ids_TK.reshape(-1),
                                  logits_TE.shape[1])
        d_logits = route_logits_grad(logits_TE, ids_TK, kept_i8, balance_E, g_w, g_losses, cfg)
        return d_logits, None, None, None, None


def route_decode_triton(logits_TE: torch.Tensor, cfg: RouterConfig,
                        expert_bias_E: torch.Tensor | None, capacity: int | None = None
                        ) -> RoutingResult:
    """Routing without noise, dropless (capacity None) or keeping each expert's first
    `capacity` assignments in priority order, with the expert-sorted layout in `order`:
    route_reference(logits_TE, cfg, capacity, expert_bias_E, None, None)'s result (weights to
    fp32 rounding, equal to route_triton's) plus sort_by_expert's plan. For small T
    (moeflow.ops.backend.decode_route_fits); under autograd the weights and losses have
    route_triton's backward."""
    logits_TE = logits_TE.contiguous()
    T, E = logits_TE.shape
    out = route_outputs(T, E, cfg.top_k, logits_TE.device)
    if not records_grad(logits_TE):
        _launch(logits_TE, cfg, expert_bias_E, capacity, out)
        return routing_result(out, capacity)
    out["weights"], out["losses"] = _RouteWithGrad.apply(logits_TE, cfg, expert_bias_E,
                                                         capacity, out)
    return routing_result(out, capacity)
