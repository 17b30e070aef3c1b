"""Decode routing on CUDA in one launch that also computes the router's logits (router backend
"triton_decode_fused"): x·Wgᵀ, then the passes of moeflow.ops.decode_route_triton (choices,
weights, counts, losses and the expert-sorted layout), optionally after the residual add +
RMSNorm ahead of the router, and optionally leaving pass 2 to the experts' kernel.

Why: the router's own logits x·Wgᵀ cost five more launches at decode (two fp32 casts, cuBLAS's
GEMV in two kernels, nan_to_num), so this kernel computes them in the same launch. Programs on a
grid of expert blocks × token blocks each compute one tile of logits from the layer input and
the gate weight, both upcast to fp32 before the product (exact for bf16 operands), summed in
fp32 over the model dim, made finite as router_logits does, and store it (the logits are also
returned). The program that draws the last ticket of an atomic counter (release-acquire, after
all its threads stored) then runs the routing passes over the whole [T, E] logits, and resets
the counter. With more than one token block (choice_rows tokens each: 4 at most) the choosing is
spread: the last program of each token block to store its tile (a ticket per block) runs pass 1
for that block's tokens and stores its counts and balance sums; the last block to finish (the
launch-wide ticket) sums those in block order, which is how one program sums its tiles, and runs
the passes after pass 1. Measured on the H200 (benchmarks/route_phases.py, session 17): 16
tokens of top-8, 19.4 -> 16.6 µs per launch; ≤ 4 tokens unchanged. Session 18: the peers'
logits, ids and block sums read through L2 (.cg) instead of volatile loads, the block sums'
loads unrolled, and the logits grid kept to one wave (logits_tiles): 16.6 -> 15.9 µs at 16
tokens, 37.6 -> 35.8 at 32, −0.2 at 1-4. Session 19: all of D in one logits chunk up to 16
tokens (the loop over D is not software-pipelined; _LOGIT_PRODUCTS_PER_WARP): 15.8 -> 13.8 µs at
16 tokens, 35.6 -> 26.5 at 32. This kernel and the one-program one choose in tiles of
choice_rows tokens, so they choose alike (the one-program kernel got slower from 8 tokens: 13.9
-> 18.6 µs at 16, it had 16-token tiles). Why many programs rather than one: a single SM streams
the gate (Qwen3-30B-A3B: 128 × 2048 bf16 = 0.5 MB) at well below the HBM rate, and its FP32
units need T·E·D/128 cycles (2 µs per token at that shape), so one program would give back what
the four saved launches save; ~16 KB of gate rows per program spreads both over tens of SMs
(logits_tiles). The sum order differs from cuBLAS's: the logits agree to fp32 rounding, not bit
for bit, and a near-tie between two experts may resolve differently than on the two-step path.
The ticket counters are why a Router keeps its own per device
(moeflow.ops.device_counters) and why one router may route on one stream at a time.

The kernel also takes the residual add + RMSNorm ahead of it (a
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

Without a capacity and for at most EXPERTS_PLACE_MAX_TOKENS tokens the kernel can stop before
pass 2 (`place_rows` False): the experts' one-launch stream kernel then writes the slots, rows
and token list (moeflow.ops.grouped_mlp_triton), since pass 2 runs on one program and grows
with the square of the assignments (5.7 of 13.9 µs at 16 tokens of top-8 on the H200).

Legend: T tokens, E experts, K top-k, N = T·K assignments, D model dim.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moeflow.config import RouterConfig
from moeflow.model.router import RoutingResult
from moeflow.ops.backend import DECODE_ROUTE_MAX_ASSIGNMENTS, EXPERTS_PLACE_MAX_TOKENS
from moeflow.ops.decode_route_triton import (choice_rows, choose_pass, pass1_scaling,
                                             plan_passes, route_args, route_outputs,
                                             route_plan, routing_result)
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.norm_triton import PendingAddNorm, residual_sum, rms_scale
from moeflow.ops.pdl import launch_next, pdl_launch, wait_for_previous
from moeflow.ops.routing_choice_triton import finite_logits
from moeflow.ops.tickets import last_to_arrive



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
    stores) routes and plans over all of them, as moeflow.ops.decode_route_triton's kernel
    does. ONE_CHUNK: all of
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
            counts, first, p_e, z = choose_pass(
                logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, t_lo, tl.minimum(t_lo + LT, T),
                E, pass1_scaling(routed_scaling, RENORMALIZE), K, SOFTMAX, SEL, HAS_BIAS,
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
                plan_passes(counts, first, p_e, z, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr,
                            ends_ptr, row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E,
                            routed_scaling, aux_coef, z_coef, capacity, K, FIRST_BALANCE, CAPPED,
                            RENORMALIZE, BLOCK_T, BLOCK_E, BLOCK_K, BLOCK_P, PAIRWISE, PLACE)
    elif last_to_arrive(ticket_ptr, tl.num_programs(0) * tl.num_programs(1)):
        route_plan(logits_ptr, bias_ptr, ids_ptr, w_ptr, kept_ptr, slots_ptr, counts_ptr,
                   ends_ptr, row_ptr, token_ptr, dropped_ptr, loss_ptr, T, E, routed_scaling,
                   aux_coef, z_coef, capacity, K, SOFTMAX, SEL, HAS_BIAS, NORMALIZE, GROUPS,
                   TOPK_GROUPS, GROUP_TOP2, FIRST_BALANCE, CAPPED, RENORMALIZE, BLOCK_T,
                   FULL_E, BLOCK_E, BLOCK_G, BLOCK_K, BLOCK_P, PAIRWISE, True, PLACE)


def route_warps(T: int, D: int, E: int, gate_bytes: int = 2, whole_rows: bool = False) -> int:
    """Warps of the fused kernel's programs (each computes a logits tile; the last runs the
    routing passes) for T tokens of model dim D over E experts. Chosen inside the served
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
    if T <= 2:
        return next(w for w in (2, 4, 8)
                    if w == 8 or logits_tiles(T, D, E, gate_bytes, w)[2] >= D)
    warps = 4 if T <= 16 else 8
    if (whole_rows and logits_tiles(T, D, E, gate_bytes, warps)[2] < D
            and logits_tiles(T, D, E, gate_bytes, 8)[2] >= D):
        return 8
    return warps


# Token blocks the fused kernel takes per launch at most (DECODE_ROUTE_MAX_ASSIGNMENTS tokens
# of top-1 in blocks of choice_rows ≥ 2), each with a ticket after the launch-wide one.
MAX_TOKEN_BLOCKS = DECODE_ROUTE_MAX_ASSIGNMENTS // 2


# The fused kernel's ticket counters: the launch-wide one, then one per token block.
ROUTE_TICKETS = 1 + MAX_TOKEN_BLOCKS


def route_tickets(device: torch.device) -> torch.Tensor:
    """The fused kernel's ticket counters, zero (every launch leaves them so), for one launch at
    a time (a Router keeps its own, moeflow.ops.device_counters)."""
    return torch.zeros(ROUTE_TICKETS, dtype=torch.int32, device=device)


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


@functools.lru_cache(maxsize=1024)
def logits_tiles(T: int, D: int, E: int, gate_bytes: int, num_warps: int = 8
                 ) -> tuple[int, int, int]:
    """(LT, LE, LD): tokens, experts and model-dim columns per logits tile. A program streams
    LE·D gate elements once per token block of LT; the grid is ⌈E/LE⌉ × ⌈T/LT⌉ programs.
    The products per step scale with the warps (128 per thread). Cached (asked on every
    decode layer call): a benchmark that changes the constants above clears it."""
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
    out = route_outputs(T, E, cfg.top_k, x_TD.device)
    logits_TE = torch.empty(T, E, dtype=torch.float32, device=x_TD.device)
    scalars, meta = route_args(cfg, T, E, expert_bias_E is not None, capacity)
    warps = route_warps(T, D, E, gate_ED.element_size(), whole_rows=prenorm is not None)
    lt, le, ld = logits_tiles(T, D, E, gate_ED.element_size(), warps)
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
        PRENORM=fused_norm, **meta, num_warps=warps, **pdl_launch(x_TD))
    return routing_result(out, capacity, place_rows), logits_TE
