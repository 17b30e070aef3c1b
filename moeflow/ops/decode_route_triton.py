"""Decode routing on CUDA in one launch: logits → choices, weights, counts, losses and the
expert-sorted layout (the dispatch plan) together.

Why: at decode sizes (a few tokens) every launch costs ~2-3 µs of latency and almost no work.
The fused router (moeflow.ops.routing_triton) still takes four launches (top-k, queue, finalize,
plus a scatter for first-choice counts) and the Triton dispatch one more, so for a decode step of
the Qwen3-30B-A3B shape the MoE layer's bookkeeping outnumbered its two weight-streaming expert
kernels. When nothing needs a gradient (inference) the whole plan fits in one program, dropless
or with a capacity (DeepSpeed-MoE's top-1/top-2 gating evaluated with eval_capacity_factor,
which took the multi-kernel router and the Triton dispatch before): the choice pass accumulates
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
DispatchPlan is sort_by_expert's, row for row (parked when there is a capacity). Without a
capacity and for at most 16 tokens the fused kernel can stop before pass 2 (`place_rows`
False): the experts' one-launch stream kernel then writes the slots, rows and token list
(moeflow.ops.grouped_mlp_triton), since pass 2 runs on one program and grows with the square
of the assignments (5.7 of 13.9 µs at 16 tokens of top-8 on the H200).

With the logits (`route_decode_fused`, router backend "triton_decode_fused"): the router's
own logits x·Wgᵀ cost five more launches at decode (two fp32 casts, cuBLAS's GEMV in two
kernels, nan_to_num), so this variant computes them in the same launch. Programs on a grid of
expert blocks × token blocks each compute one tile of logits from the layer input and the gate
weight, both upcast to fp32 before the product (exact for bf16 operands), summed in fp32 over
the model dim, made finite as router_logits does, and store it (the logits are also returned).
The program that draws the last ticket of an atomic counter (release-acquire, after all its
threads stored) then runs the passes above over the whole [T, E] logits, and resets the
counter. With more than one token block (choice_rows tokens each: 4 at most) the choosing is
spread: the last program of each token block to store its tile (a ticket per block) runs pass 1
for that block's tokens and stores its counts and balance sums; the last block to finish (the
launch-wide ticket) sums those in block order, which is how one program sums its tiles, and
runs the passes after pass 1. Measured on the H200 (benchmarks/route_phases.py, session 17):
16 tokens of top-8, 19.4 -> 16.6 µs per launch; ≤ 4 tokens unchanged. Session 18: the
peers' logits, ids and block sums read through L2 (.cg) instead of volatile loads, the block
sums' loads unrolled, and the logits grid kept to one wave (logits_tiles): 16.6 -> 15.9 µs at
16 tokens, 37.6 -> 35.8 at 32, −0.2 at 1-4. Session 19: all of D in one logits chunk up to 16
tokens (the loop over D is not software-pipelined; _LOGIT_PRODUCTS_PER_WARP): 15.8 -> 13.8 µs
at 16 tokens, 35.6 -> 26.5 at 32. Both kernels choose in
tiles of choice_rows tokens, so they choose alike (the one-program kernel got slower from 8
tokens: 13.9 -> 18.6 µs at 16, it had 16-token tiles). Why many programs rather than one: a
single SM streams the gate (Qwen3-30B-A3B: 128 × 2048 bf16 = 0.5 MB) at well below the HBM
rate, and its FP32 units need T·E·D/128 cycles (2 µs per token at that shape), so one program
would give back what the four saved launches save; ~16 KB of gate rows per program spreads
both over tens of SMs (logits_tiles). The sum
order differs from cuBLAS's: the logits agree to fp32 rounding, not bit for bit, and a near-tie
between two experts may resolve differently than on the two-step path. The ticket counters are
why a Router keeps its own per device (moeflow.ops.tickets.zeroed_counters) and why one router
may route on one stream at a time.

The fused variant also takes the residual add + RMSNorm ahead of it (a
moeflow.ops.norm_triton.PendingAddNorm in place of its input rows: at decode the add of the
attention's output to the residual stream and the MoE layer's input norm). Every logits program
computes that pass for its token rows from the residual and the attention's output (the norm
kernel's arithmetic; one row is 4 KB of each at Qwen3-30B-A3B's D 2048), uses the normalised
rows for its logits, and the first expert block's programs store s and y for the experts and
the next layer: one launch and one kernel boundary fewer per layer where all of D is one logits
tile: at 16 tokens of that shape route_warps' 4 warps split D, so with a norm pending it
chooses 8, whose tiles hold it (where none does, the norm's own pass runs first). Measured on
the H200 (benchmarks/results/decode_timeline, session 30): at one token the norm's end step
(1.50-1.61 µs) and the router's (5.72-5.75) became one of 6.26-6.33 µs, graph replay 2.715 ->
2.663 ms in one call; at 16 tokens 2.17 + 9.06 -> 10.41 µs, 10.390 -> 10.34-10.35 ms (ptxas
sm_90: 246 registers at one token, 127 at 16 on 8 warps, no spills; 128 at one token without
the norm).

Legend: T tokens, E experts, K top-k, N = T·K assignments, D model dim.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.config import RouterConfig
from moeflow.model.router import ExpertOrder, RoutingResult, selects_by_logits
from moeflow.ops.backend import DECODE_ROUTE_MAX_ASSIGNMENTS, EXPERTS_PLACE_MAX_TOKENS
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.norm_triton import PendingAddNorm, residual_sum, rms_scale
from moeflow.ops.pdl import launch_next, pdl_launch, wait_for_previous
from moeflow.ops.routing_slots_triton import store_losses
from moeflow.ops.routing_triton import SEL_DEEPSPEED, SEL_SCORES, choose_tile, finite_logits
from moeflow.ops.tickets import last_to_arrive, zeroed_counters


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
def _choose(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, t_lo, t_hi, E, pass1_scaling,
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
def _plan(counts, first, p_e, z, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr,
          ends_ptr, row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling, aux_coef,
          z_coef, capacity, K: tl.constexpr, FIRST_BALANCE: tl.constexpr, CAPPED: tl.constexpr,
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
def _route_plan(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr, ends_ptr,
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
    counts, first, p_e, z = _choose(
        logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, 0, T, E,
        _pass1_scaling(routed_scaling, RENORMALIZE), K, SOFTMAX, SEL, HAS_BIAS, NORMALIZE,
        GROUPS, TOPK_GROUPS, GROUP_TOP2, FIRST_BALANCE, CAPPED, BLOCK_T, FULL_E, BLOCK_E,
        BLOCK_G, BLOCK_K, PEER_LOGITS)
    _plan(counts, first, p_e, z, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr, ends_ptr,
          row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling, aux_coef, z_coef,
          capacity, K, FIRST_BALANCE, CAPPED, RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_P,
          PAIRWISE, PLACE)


@triton.jit
def _pass1_scaling(routed_scaling, RENORMALIZE: tl.constexpr):
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
    _route_plan(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr, ends_ptr,
                row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling, aux_coef,
                z_coef, capacity, K, SOFTMAX, SEL, HAS_BIAS, NORMALIZE, GROUPS, TOPK_GROUPS,
                GROUP_TOP2, FIRST_BALANCE, CAPPED, RENORMALIZE, BLOCK_T, FULL_E, BLOCK_E,
                BLOCK_G, BLOCK_K, BLOCK_P, PAIRWISE, False)


@triton.jit
def _gate_chunk(gate_ptr, experts, emask, d, D):
    """The gate rows `experts`, columns d, upcast to fp32."""
    return tl.load(gate_ptr + experts[:, None].to(tl.int64) * D + d[None, :],
                   mask=emask[:, None] & (d < D)[None, :], other=0.0).to(tl.float32)


@triton.jit
def _norm_operands(res_ptr, h_ptr, nw_ptr, rows, rmask, d, dmask, D):
    """The loads of _add_norm: the token rows of the residual x and of h, and the norm's
    weight (upcast to fp32), issued together."""
    offs = rows[:, None].to(tl.int64) * D + d[None, :]
    m = rmask[:, None] & dmask[None, :]
    x = tl.load(res_ptr + offs, mask=m, other=0.0)
    h = tl.load(h_ptr + offs, mask=m, other=0.0)
    w = tl.load(nw_ptr + d, mask=dmask, other=0.0).to(tl.float32)
    return x, h, w


@triton.jit
def _add_norm(x, h, w, s_ptr, y_ptr, rows, rmask, d, dmask, D, eps, store):
    """moeflow.ops.norm_triton's add + RMSNorm pass for the token rows (_norm_operands), all D
    columns in one tile: s = x + h and y = s · rsqrt(mean(s²) + eps) · w, each rounded once to
    x's dtype, the same arithmetic (its helpers; only the order of the fp32 sum of squares may
    differ); s and y stored where `store`; returns y in fp32."""
    offs = rows[:, None].to(tl.int64) * D + d[None, :]
    m = rmask[:, None] & dmask[None, :]
    s = residual_sum(x, h)
    y = rms_scale(s.to(tl.float32), w, D, eps, 1).to(y_ptr.dtype.element_ty)
    tl.store(s_ptr + offs, s, mask=m & store)
    tl.store(y_ptr + offs, y, mask=m & store)
    return y.to(tl.float32)


@triton.jit
def _decode_route_logits_kernel(x_ptr, gate_ptr, logits_ptr, ticket_ptr, part_ptr, bias_ptr,
                                ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr, ends_ptr, row_ptr,
                                token_ptr, dropped_ptr, loss_ptr, res_ptr, h_ptr, nw_ptr, s_ptr,
                                eps, T, D, E, routed_scaling,
                                aux_coef, z_coef, capacity, K: tl.constexpr,
                                SOFTMAX: tl.constexpr, SEL: tl.constexpr,
                                HAS_BIAS: tl.constexpr, NORMALIZE: tl.constexpr,
                                GROUPS: tl.constexpr, TOPK_GROUPS: tl.constexpr,
                                GROUP_TOP2: tl.constexpr, FIRST_BALANCE: tl.constexpr,
                                CAPPED: tl.constexpr, RENORMALIZE: tl.constexpr,
                                BLOCK_T: tl.constexpr, FULL_E: tl.constexpr,
                                BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr,
                                BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr,
                                PAIRWISE: tl.constexpr, LT: tl.constexpr,
                                LE: tl.constexpr, LD: tl.constexpr,
                                SPLIT_PASS1: tl.constexpr, PART_BLOCKS: tl.constexpr,
                                ONE_CHUNK: tl.constexpr, PLACE: tl.constexpr,
                                PRENORM: tl.constexpr, PDL: tl.constexpr):
    """Program (e, t) computes the [LT, LE] tile of finite fp32 logits x·Wgᵀ for token block t
    and expert block e and stores it; the last program to finish (a ticket taken after the
    stores) routes and plans over all of them, as _decode_route_kernel does. ONE_CHUNK: all of
    D in one tile (LD ≥ D), the rows' and the gate's loads issued together. PRENORM (with
    ONE_CHUNK only): x is the RMSNorm of res + h, which every program computes for its token
    rows (_add_norm) and the first expert block's programs store, with the sum s = res + h, for
    the layer after."""
    wait_for_previous(PDL)
    pe = tl.program_id(0)
    pt = tl.program_id(1)
    rows = pt * LT + tl.arange(0, LT)
    experts = pe * LE + tl.arange(0, LE)
    rmask = rows < T
    emask = experts < E
    acc = tl.zeros([LT, LE], tl.float32)
    # Each operand upcast to fp32 before the product: a bf16·bf16 product is exact in fp32,
    # and the sums are fp32 (as F.linear on fp32 copies; only the order of the sum differs).
    if ONE_CHUNK:
        # The rows' loads, then the gate's, before any arithmetic: one trip to memory for all.
        d = tl.arange(0, LD)
        dmask = d < D
        if PRENORM:
            res, h, nw = _norm_operands(res_ptr, h_ptr, nw_ptr, rows, rmask, d, dmask, D)
        else:
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + d[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
        w = _gate_chunk(gate_ptr, experts, emask, d, D)
        if PRENORM:
            x = _add_norm(res, h, nw, s_ptr, x_ptr, rows, rmask, d, dmask, D, eps, pe == 0)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    else:
        tl.static_assert(not PRENORM, "the add + norm needs all of D in one tile")
        for d0 in range(0, D, LD):
            d = d0 + tl.arange(0, LD)
            dmask = d < D
            x = tl.load(x_ptr + rows[:, None].to(tl.int64) * D + d[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(x[:, None, :] * _gate_chunk(gate_ptr, experts, emask, d, D)[None, :, :],
                          axis=2)
    tl.store(logits_ptr + rows[:, None].to(tl.int64) * E + experts[None, :], finite_logits(acc),
             mask=rmask[:, None] & emask[None, :])
    launch_next(PDL)
    # The last program to store its tile (moeflow.ops.tickets) sees every tile.
    if SPLIT_PASS1:
        # Two levels: the last of token block pt's programs chooses that block's experts and
        # stores its sums; the last block to do so runs the rest over all T tokens.
        if last_to_arrive(ticket_ptr + 1 + pt, tl.num_programs(0)):
            t_lo = pt * LT
            counts, first, p_e, z = _choose(
                logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, t_lo, tl.minimum(t_lo + LT, T),
                E, _pass1_scaling(routed_scaling, RENORMALIZE), K, SOFTMAX, SEL, HAS_BIAS,
                NORMALIZE, GROUPS, TOPK_GROUPS, GROUP_TOP2, FIRST_BALANCE, CAPPED, LT,
                FULL_E, BLOCK_E, BLOCK_G, BLOCK_K, True)
            cols = tl.arange(0, BLOCK_E)
            part = part_ptr + pt * 4 * BLOCK_E
            tl.store(part + cols, counts.to(tl.float32))
            tl.store(part + BLOCK_E + cols, first.to(tl.float32))
            tl.store(part + 2 * BLOCK_E + cols, p_e)
            tl.store(part + 3 * BLOCK_E + tl.arange(0, 1), tl.zeros([1], tl.float32) + z)
            if last_to_arrive(ticket_ptr, tl.num_programs(1)):
                # The blocks' sums in block order, as one program sums its tiles; the loop
                # is unrolled (PART_BLOCKS ≥ the blocks) so that every block's loads are in
                # flight at once (a block past the last adds zeros).
                counts = tl.zeros([BLOCK_E], tl.int32)
                first = tl.zeros([BLOCK_E], tl.int32)
                p_e = tl.zeros([BLOCK_E], tl.float32)
                z = tl.sum(tl.zeros([2], tl.float32), axis=0)
                for b in tl.static_range(PART_BLOCKS):
                    live = b < tl.num_programs(1)
                    part = part_ptr + b * 4 * BLOCK_E
                    counts += tl.load(part + cols, mask=live, other=0.0,
                                      cache_modifier=".cg").to(tl.int32)
                    first += tl.load(part + BLOCK_E + cols, mask=live, other=0.0,
                                     cache_modifier=".cg").to(tl.int32)
                    p_e += tl.load(part + 2 * BLOCK_E + cols, mask=live, other=0.0,
                                   cache_modifier=".cg")
                    z += tl.load(part + 3 * BLOCK_E, mask=live, other=0.0, cache_modifier=".cg")
                _plan(counts, first, p_e, z, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr,
                      ends_ptr, row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E,
                      routed_scaling, aux_coef, z_coef, capacity, K, FIRST_BALANCE, CAPPED,
                      RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_P, PAIRWISE, PLACE)
    elif last_to_arrive(ticket_ptr, tl.num_programs(0) * tl.num_programs(1)):
        _route_plan(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr,
                    ends_ptr, row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling,
                    aux_coef, z_coef, capacity, K, SOFTMAX, SEL, HAS_BIAS, NORMALIZE, GROUPS,
                    TOPK_GROUPS, GROUP_TOP2, FIRST_BALANCE, CAPPED, RENORMALIZE, BLOCK_T,
                    FULL_E, BLOCK_E, BLOCK_G, BLOCK_K, BLOCK_P, PAIRWISE, True, PLACE)


def _outputs(T: int, E: int, K: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """The kernels' outputs, in their argument order (ids … losses)."""
    def new(*shape, dtype=torch.int64):
        return torch.empty(*shape, dtype=dtype, device=dev)
    return {"ids": new(T, K), "weights": new(T, K, dtype=torch.float32),
            "kept": new(T, K, dtype=torch.int8), "slots": new(T, K), "counts": new(E),
            "ends": new(E), "rows": new(T, K), "tokens": new(T * K), "dropped": new(()),
            "losses": new(3, dtype=torch.float32)}


def _route_args(cfg: RouterConfig, T: int, E: int, has_bias: bool, capacity: int | None,
                D: int = 0, gate_bytes: int = 2, whole_rows: bool = False
                ) -> tuple[tuple, dict]:
    """The routing pass's scalar arguments (routed_scaling, aux_coef, z_coef, capacity) and
    constexprs; D, gate_bytes: the fused kernel's model dim and gate element size (D 0: the
    logits are given); whole_rows: route_warps'."""
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
    return scalars, dict(
        K=K, SOFTMAX=cfg.score_func == "softmax", SEL=sel, HAS_BIAS=has_bias,
        NORMALIZE=cfg.normalizes and not capped, GROUPS=cfg.num_groups,
        TOPK_GROUPS=cfg.topk_groups, GROUP_TOP2=E // cfg.num_groups >= 2,
        FIRST_BALANCE=cfg.balance_on_first_choice and K > 1,
        CAPPED=capped, RENORMALIZE=cfg.normalizes and capped,
        # Tiles of at most 4 tokens (choice_rows; 16 until session 17) and 2048 scores (with
        # 16-token tiles, 4 warps or 4096-score tiles had spilled up to 900 bytes; the warps:
        # route_warps). Pass 2: all T·K assignments in one [BLOCK_P, BLOCK_P] pairwise tile up to
        # 128 of them (H200, plan program alone, Qwen3 router, T·K 128: 14.7 µs, 20.4 with the
        # one-hot sort; all pairs over tiles at T·K 512 took 107 µs against its 77), else
        # one-hot tiles of at most 8192 entries; with a capacity the starts' look-up is
        # [BLOCK_P, BLOCK_E] too.
        BLOCK_T=choice_rows(T, E), FULL_E=E == block_e,
        BLOCK_E=block_e, BLOCK_G=next_power_of_2(cfg.num_groups),
        BLOCK_K=next_power_of_2(K),
        BLOCK_P=block_p, PAIRWISE=pairwise,
        num_warps=route_warps(T, D, E, gate_bytes, whole_rows))


def route_warps(T: int, D: int = 0, E: int = 0, gate_bytes: int = 2,
                whole_rows: bool = False) -> int:
    """Warps of the routing program (and of every logits program of the fused kernel) for T
    tokens of model dim D over E experts (D 0: the logits are given, the one-program kernel,
    which keeps the 8 warps session 13 measured for it). Chosen inside the served
    decode graph of Qwen3-30B-A3B (H200, session 27, benchmarks/results/decode_timeline: 2, 4
    and 8 warps forced in turn, two passes, the layer's period): up to 2 tokens the fewest of
    2, 4, 8 warps whose logits tile takes all of D in one chunk (logits_tiles; Qwen3's 2048:
    2), the router's end step 6.75 -> 5.73 µs at 1 token and the experts' after it ~1 µs lower
    (their programs start earlier beside smaller ones): period 56.2 -> 54.4 µs, at 2 tokens
    77.4 -> 75.6; up to 16 tokens 4 warps, period −0.8 / −0.9 / −0.4 µs at 4 / 8 / 16 tokens
    (2 warps lost 1.4-3.2 µs there against 8); past 16 tokens 8, which the kernel alone
    preferred at T·K 8-128 in session 13 (benchmarks/decode_route.py --sweep-warps). Tiles of at
    most 4 tokens (choice_rows) and pass 2's pairwise tile at ≤ 16 tokens compile without
    spills at these warps (ptxas sm_90, benchmarks/decode_route_ptxas.py). `whole_rows` (the
    kernel computes the add + norm ahead, which needs all of D in one tile): 8 warps where the
    choice above splits D and 8 do not (16 tokens of Qwen3-30B-A3B: norm + router 2.17 + 9.06
    -> 10.41 µs on the H200, session 30)."""
    if not D:
        return 8
    if T <= 2:
        return next(w for w in (2, 4, 8)
                    if w == 8 or logits_tiles(T, D, E, gate_bytes, w)[2] >= D)
    warps = 4 if T <= 16 else 8
    if (whole_rows and logits_tiles(T, D, E, gate_bytes, warps)[2] < D
            and logits_tiles(T, D, E, gate_bytes, 8)[2] >= D):
        return 8
    return warps


def choice_rows(T: int, E: int) -> int:
    """Tokens per pass-1 tile (at most 2048 scores), also the fused kernel's token block: its
    blocks' programs choose their own tokens' experts with the tiles one program would use, so
    both kernels choose, and sum the balance terms, alike."""
    return max(2, min(next_power_of_2(max(T, 1)), 4,
                      2048 // next_power_of_2(E)))


# Token blocks the fused kernel takes per launch at most (DECODE_ROUTE_MAX_ASSIGNMENTS tokens
# of top-1 in blocks of choice_rows ≥ 2), each with a ticket after the launch-wide one.
MAX_TOKEN_BLOCKS = DECODE_ROUTE_MAX_ASSIGNMENTS // 2


# The fused kernel's ticket counters: the launch-wide one, then one per token block.
ROUTE_TICKETS = 1 + MAX_TOKEN_BLOCKS


def route_tickets(device: torch.device) -> torch.Tensor:
    """The fused kernel's ticket counters, zero (every launch leaves them so), for one launch at
    a time (a Router keeps its own, moeflow.ops.tickets.zeroed_counters)."""
    return zeroed_counters(None, ROUTE_TICKETS, device)


def _result(out: dict[str, torch.Tensor], capacity: int | None, placed: bool = True
            ) -> RoutingResult:
    losses = out["losses"]
    return RoutingResult(ids_TK=out["ids"], weights_TK=out["weights"],
                         kept_TK=out["kept"].view(torch.bool), slots_TK=out["slots"],
                         counts_E=out["counts"], num_dropped=out["dropped"], capacity=capacity,
                         aux_loss=losses[0], z_loss=losses[1], loss=losses[2],
                         order=ExpertOrder(row_TK=out["rows"], token_N=out["tokens"],
                                           ends_E=out["ends"], placed=placed))


def route_decode_triton(logits_TE: torch.Tensor, cfg: RouterConfig,
                        expert_bias_E: torch.Tensor | None, capacity: int | None = None
                        ) -> RoutingResult:
    """Routing without noise or autograd, dropless (capacity None) or keeping each expert's
    first `capacity` assignments in priority order, with the expert-sorted layout in `order`:
    route_reference(logits_TE, cfg, capacity, expert_bias_E, None, None)'s result (weights to
    fp32 rounding, equal to route_triton's) plus sort_by_expert's plan. For small T
    (moeflow.ops.backend.decode_route_fits)."""
    logits_TE = logits_TE.contiguous()
    T, E = logits_TE.shape
    out = _outputs(T, E, cfg.top_k, logits_TE.device)
    scalars, meta = _route_args(cfg, T, E, expert_bias_E is not None, capacity)
    _decode_route_kernel[(1,)](
        logits_TE, expert_bias_E if expert_bias_E is not None else logits_TE, *out.values(),
        T, E, *scalars, **meta, **pdl_launch(logits_TE))
    return _result(out, capacity)


# Logits tiles: at most this many products per step (LT·LE·LD) and warp, and about this many
# bytes of the gate per program (LE rows of D), so that decode reads the gate from many SMs
# (Qwen3-30B-A3B: 64 programs of two 4 KB rows, the fewest rows a tile takes; see route_warps
# for the measurement: 2, 4 and 8 KB all give these tiles). With several token blocks LE grows
# until the grid is at most _LOGITS_PROGRAMS: the kernel's ~190-240 registers per thread (the
# routing pass's) leave room for one 8-warp program per SM, so a bigger grid runs in two waves
# (16 tokens of Qwen3-30B-A3B: 64 × 4 programs before, 32 × 4 now; an H200 has 132 SMs).
# Products per warp: the loop over D is not software-pipelined (its tiles feed no tl.dot), so
# each chunk's gate load waits for the chunk before it; 4096 (128 per thread, session 19; 1024
# before) takes all of D in one chunk up to 16 tokens of Qwen3-30B-A3B (ptxas sm_90: 251
# registers at 16 tokens, no spills; benchmarks/decode_route_ptxas.py). H200: 15.84 -> 13.79
# µs at 16 tokens, 35.58 -> 26.53 at 32 (benchmarks/route_phases.py, one process).
_LOGIT_PRODUCTS_PER_WARP = 4096
_GATE_BYTES_PER_PROGRAM = 8192
_LOGITS_PROGRAMS = 128


def logits_tiles(T: int, D: int, E: int, gate_bytes: int, num_warps: int = 8
                 ) -> tuple[int, int, int]:
    """(LT, LE, LD): tokens, experts and model-dim columns per logits tile. A program streams
    LE·D gate elements once per token block of LT; the grid is ⌈E/LE⌉ × ⌈T/LT⌉ programs.
    The products per step scale with the warps (128 per thread)."""
    lt = choice_rows(T, E)
    le = next_power_of_2(max(1, _GATE_BYTES_PER_PROGRAM // max(1, D * gate_bytes)))
    one_wave = next_power_of_2(cdiv(E * cdiv(max(T, 1), lt), _LOGITS_PROGRAMS))
    le = max(2, min(max(le, one_wave), next_power_of_2(E), 64))
    products = _LOGIT_PRODUCTS_PER_WARP * num_warps
    ld = max(16, min(next_power_of_2(D), products // (lt * le)))
    return lt, le, ld


def route_decode_fused(x_TD: torch.Tensor | PendingAddNorm, gate_ED: torch.Tensor,
                       cfg: RouterConfig, expert_bias_E: torch.Tensor | None,
                       tickets: torch.Tensor, capacity: int | None = None,
                       place_rows: bool = True) -> tuple[RoutingResult, torch.Tensor]:
    """route_decode_triton(router_logits(x_TD, gate_ED), …) in one launch: returns the
    RoutingResult and the finite fp32 logits_TE the kernel computed on the way (the same
    products as router_logits, summed in another order than cuBLAS/MKL: equal to a few fp32
    ulps, and exactly where every partial sum is representable).
    `tickets`: route_tickets' counters (zero, left at zero), for one launch at a time: a
    router routes on one stream at a time. More than one token block: each block's last
    program to finish chooses that block's experts (pass 1), the last block plans.
    `place_rows` False (dropless, at most EXPERTS_PLACE_MAX_TOKENS tokens): the kernel stops
    after the counts, ends and losses, and the result's slots_TK and order.row_TK / token_N are
    left for the experts' kernel to write from the ids (ExpertOrder.placed False; see
    moeflow.ops.grouped_mlp_triton.expert_mlp_stream). Pass 2 is the part of this kernel that
    grows with the square of the assignments: 5.7 of 13.9 µs at 16 tokens of top-8 on the
    H200 (benchmarks/results/decode_route, session 24), on its one last program.
    x_TD may be a PendingAddNorm (the rows are its y, [..., D], not yet written): where all of
    D fits one logits tile (route_warps' whole_rows) the kernel's programs compute the add +
    RMSNorm themselves and store s and y (the norm's launch saved), else its run() writes them
    first."""
    prenorm = x_TD if isinstance(x_TD, PendingAddNorm) else None
    if prenorm is not None:  # its y is contiguous: the kernel writes into it, not a copy
        x_TD = prenorm.y.view(-1, prenorm.y.shape[-1])
    x_TD = x_TD.contiguous()
    gate_ED = gate_ED.contiguous()
    T, D = x_TD.shape
    E = gate_ED.shape[0]
    if not place_rows and (capacity is not None or T > EXPERTS_PLACE_MAX_TOKENS):
        raise ValueError(f"route_decode_fused: the experts place the rows only dropless and "
                         f"for at most {EXPERTS_PLACE_MAX_TOKENS} tokens, got {T} tokens, "
                         f"capacity {capacity}")
    out = _outputs(T, E, cfg.top_k, x_TD.device)
    logits_TE = torch.empty(T, E, dtype=torch.float32, device=x_TD.device)
    scalars, meta = _route_args(cfg, T, E, expert_bias_E is not None, capacity, D,
                                gate_ED.element_size(), whole_rows=prenorm is not None)
    lt, le, ld = logits_tiles(T, D, E, gate_ED.element_size(), meta["num_warps"])
    grid = (cdiv(E, le), max(1, cdiv(T, lt)))
    if tickets.numel() < 1 + grid[1] or tickets.dtype != torch.int32:
        raise ValueError(f"route_decode_fused: tickets must be int32 with {1 + grid[1]} "
                         f"counters for {T} tokens, got {tickets.numel()} {tickets.dtype}")
    part = torch.empty(grid[1], 4, meta["BLOCK_E"], dtype=torch.float32, device=x_TD.device)
    fused_norm = prenorm is not None and ld >= D
    if prenorm is not None and not fused_norm:
        prenorm.run()
    norm_args = ((prenorm.x, prenorm.h, prenorm.weight, prenorm.s, prenorm.eps) if fused_norm
                 else (x_TD, x_TD, x_TD, x_TD, 0.0))
    _decode_route_logits_kernel[grid](
        x_TD, gate_ED, logits_TE, tickets, part,
        expert_bias_E if expert_bias_E is not None else logits_TE, *out.values(), *norm_args,
        T, D, E, *scalars, LT=lt, LE=le, LD=ld, SPLIT_PASS1=grid[1] > 1,
        PART_BLOCKS=next_power_of_2(grid[1]), ONE_CHUNK=ld >= D, PLACE=place_rows,
        PRENORM=fused_norm, **meta, **pdl_launch(x_TD))
    return _result(out, capacity, place_rows), logits_TE
