"""Top-p without a sort: where each whole row's nucleus ends, found by a search over its logits'
order keys spread over the row's tiles, four bits a launch (moeflow.infer.sampling: a row with
top-p and no top-k keeps the smallest prefix of its logits in the total order, value then lower
id, whose mass reaches p of its whole row's mass).

Why: the nucleus is a prefix of the row in that order, and sorting all 151,936 logits of a
Qwen3 row to find it cost +0.27 ms a batch-1 step and +0.40 at 16 (H100, session 41), where a
temperature alone costs +0.01. Finding the prefix's end needs no order, only masses: the
largest key t whose logits and those above it hold at least `limit` = p × the row's mass. A
session-41 version searched for t in the row's one program (passes over the whole row by one
SM): ~2 ms a step on the random-weight model, whose flat logits put every nucleus past the
best 1,024 candidates it tried first (benchmarks/results/sampling, patch kept there).

How: the keys are moeflow.ops.top_k_triton.order_key's (BITS = 16 for bf16 and fp16 logits, 32
for fp32), and t is built from the top, DIGIT bits a launch. In launch l every program of a row
takes one tile of BLOCK logits and sums, for each of the 16 keys t_l | d << shift, the mass of
its logits at or above that key (16 sums over the tile); the last of the row's programs to
arrive (moeflow.ops.tickets) adds the tiles' sums and keeps the largest d whose mass reaches
the limit (the row's mass itself, the first launch's key 0, sets the limit). After BITS / 4
launches t is exact: everything above t is kept, and of the logits tied at t (equal values) the
first ones in id order while the mass before them is below the limit; the last launch also
counts each tile's ties at its 16 keys, so its last program finds the id where they stop
(`cut`). The row's draw (moeflow.ops.sample_triton, whole rows) then keeps a logit of key above
t, or at t with an id below cut.

Measured (H100, session 43, benchmarks/results/sampling and decode_served; Qwen3-30B-A3B's
151,936-logit bf16 rows, top-p 0.95 alone): the four launches take 28 µs of kernel time a call
at batch 1 and 100 µs at 16 (the sort's path: a served batch-1 step +0.31 ms over greedy, now
+0.06; batch 16 +0.43, now +0.10-0.14). Sixteen sums over the tile's logits, each logit's key
and mass computed once: the same 16 masses as one [BLOCK, 16] masked sum took 216 µs at 16
(Triton recomputed each logit's key and exp per column), as one 16-tuple reduction 106; tiles of
1,024 logits on 4 warps against 512, 2,048 or 8 warps.

The sums run in another order than the reference's (a sort, then a running sum over the sorted
logits, the row's mass summed in id order: moeflow.infer.sampling.draw_reference, row_mass), so
a logit whose mass before it is within the last bits of the limit may fall on the other side,
as between moeflow.ops.sample_triton and its reference. A row with p = 1 keeps its whole row
(t = 0, below every key): its programs return at once.

Legend: S sampled rows, B logits rows, V logits per row, P tiles per row, D = 16 digits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.infer.sampling import TABLE_COLUMNS
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.sample_triton import scaled
from moeflow.ops.tickets import last_to_arrive
from moeflow.ops.top_k_triton import order_key

DIGIT = 4  # bits of the key found per launch (16 masses per logit)
BLOCK = 1024  # logits per program (a 151,936-token row: 149 tiles)
NUM_WARPS = 4
INTERPRETER_BLOCK = 16  # the CPU tests' tiles: several per row


@triton.jit
def _tile(val_ptr, stride_v, V, table_ptr, argmax_ptr, s, t, BITS: tl.constexpr,
          BLOCK: tl.constexpr):
    """Tile t of table row s's logits: (ids, valid, order keys as int64, e = exp(x)), x as the
    draw makes it (moeflow.ops.sample_triton.scaled, the shift the row's maximum read at its
    argmax)."""
    temperature = tl.load(table_ptr + s * 6).to(tl.float32)
    row = tl.load(table_ptr + s * 6 + 5).to(tl.int64)
    top = tl.load(val_ptr + row * stride_v + tl.load(argmax_ptr + row)).to(tl.float32)
    ids = t * BLOCK + tl.arange(0, BLOCK)
    valid = ids < V
    v = tl.load(val_ptr + row * stride_v + ids, mask=valid, other=0.0)
    e = tl.where(valid, tl.exp(scaled(v, top, temperature)), 0.0)
    return ids, valid, order_key(v, valid, BITS).to(tl.int64), e


@triton.jit
def _level_kernel(val_ptr, stride_v, V, table_ptr, argmax_ptr, bounds_ptr, mass_ptr, ge_ptr,
                  tie_n_ptr, tie_e_ptr, tickets_ptr, P, SHIFT: tl.constexpr,
                  FIRST: tl.constexpr, BITS: tl.constexpr, BLOCK: tl.constexpr,
                  BLOCK_P: tl.constexpr):
    """One launch of the search: program (s, t) sums tile t's masses at or above the 16 keys
    lo | d << SHIFT (lo: the key found so far, bounds[s, 0]); the row's last program keeps the
    largest d whose mass reaches the limit. mass[s] = (the mass above the range searched, the
    limit). SHIFT == 0 (the last launch): also the ties' cut, bounds[s, 1]."""
    s = tl.program_id(0)
    t = tl.program_id(1)
    p = tl.load(table_ptr + s * 6 + 2).to(tl.float32)
    if p >= 1.0:
        if FIRST:  # the whole row: every key is above 0
            tl.store(bounds_ptr + s * 2 + tl.arange(0, 2), tl.zeros([2], tl.int64),
                     mask=t == 0)
    else:
        ids, valid, key, e = _tile(val_ptr, stride_v, V, table_ptr, argmax_ptr, s, t, BITS,
                                   BLOCK)
        if FIRST:
            lo = tl.zeros([], tl.int64)
        else:
            lo = tl.load(bounds_ptr + s * 2)
        d = tl.arange(0, 16)
        part = (s * P + t) * 16 + d
        # One sum a key over the tile's logits, each logit's key and e computed once.
        rel = key - lo
        ge_D = tl.zeros([16], tl.float32)
        for j in tl.static_range(16):
            ge_D = tl.where(d == j, tl.sum(tl.where(rel >= (j << SHIFT), e, 0.0), axis=0), ge_D)
        tl.store(ge_ptr + part, ge_D)
        if SHIFT == 0:
            n_D = tl.zeros([16], tl.int32)
            e_D = tl.zeros([16], tl.float32)
            for j in tl.static_range(16):
                tied = rel == j
                n_D = tl.where(d == j, tl.sum(tied.to(tl.int32), axis=0), n_D)
                e_D = tl.where(d == j, tl.max(tl.where(tied, e, 0.0), axis=0), e_D)
            tl.store(tie_n_ptr + part, n_D)
            tl.store(tie_e_ptr + part, e_D)
        if last_to_arrive(tickets_ptr + s, P):
            ps = tl.arange(0, BLOCK_P)
            pmask = ps < P
            parts = (s * P + ps[:, None]) * 16 + d[None, :]
            # Through L2 (.cg): the other programs' sums, not this SM's L1 copy.
            ge_D = tl.sum(tl.load(ge_ptr + parts, mask=pmask[:, None], other=0.0,
                                  cache_modifier=".cg"), axis=0)
            if FIRST:  # key 0 holds the whole row
                upper = 0.0
                limit = p * tl.sum(tl.where(d == 0, ge_D, 0.0), axis=0)
                tl.store(mass_ptr + s * 2 + 1, limit)
            else:
                upper = tl.load(mass_ptr + s * 2)
                limit = tl.load(mass_ptr + s * 2 + 1)
            # d = 0 always reaches it (the previous launch's choice); the largest d that does.
            best = tl.max(tl.where(ge_D >= limit, d, 0), axis=0)
            upper = tl.where(best < 15, tl.sum(tl.where(d == best + 1, ge_D, 0.0), axis=0),
                             upper)
            lo += best.to(tl.int64) << SHIFT
            tl.store(bounds_ptr + s * 2, lo)
            tl.store(mass_ptr + s * 2, upper)
            if SHIFT == 0:
                _store_cut(val_ptr, stride_v, V, table_ptr, argmax_ptr, bounds_ptr, tie_n_ptr,
                           tie_e_ptr, s, P, best, lo, limit - upper, BITS, BLOCK, BLOCK_P)


@triton.jit
def _store_cut(val_ptr, stride_v, V, table_ptr, argmax_ptr, bounds_ptr, tie_n_ptr, tie_e_ptr,
               s, P, best, lo, room, BITS: tl.constexpr, BLOCK: tl.constexpr,
               BLOCK_P: tl.constexpr):
    """bounds[s, 1]: one past the id of the last tie kept. The logits at key lo (all of one
    value: mass e each) are kept in id order while the mass before them is below the limit,
    `room` above the mass of the keys above lo: the first c with c·e >= room is not."""
    ps = tl.arange(0, BLOCK_P)
    pmask = ps < P
    col = (s * P + ps) * 16 + best
    n_P = tl.load(tie_n_ptr + col, mask=pmask, other=0, cache_modifier=".cg")
    e = tl.max(tl.load(tie_e_ptr + col, mask=pmask, other=0.0, cache_modifier=".cg"), axis=0)
    n = tl.sum(n_P, axis=0)
    kept = tl.minimum(tl.ceil(room / e), n.to(tl.float32))  # e = 0 (none tied): inf -> n
    kept = tl.maximum(kept, 1.0).to(tl.int32)
    # The tile holding the kept-th tie, and that tie among the tile's.
    through_P = tl.cumsum(n_P, axis=0)
    tile = tl.sum((through_P < kept).to(tl.int32), axis=0)
    need = kept - tl.max(tl.where(through_P < kept, through_P, 0), axis=0)
    ids, valid, key, _ = _tile(val_ptr, stride_v, V, table_ptr, argmax_ptr, s, tile, BITS,
                               BLOCK)
    tied = (key == lo) & valid
    rank = tl.cumsum(tied.to(tl.int32), axis=0)
    last_id = tl.sum(tl.where(tied & (rank == need), ids, 0), axis=0)
    tl.store(bounds_ptr + s * 2 + 1, tl.where(n > 0, last_id + 1, 0).to(tl.int64))


def nucleus_bounds_triton(logits_BV: torch.Tensor, table_S6: torch.Tensor,
                          argmax_B: torch.Tensor, tickets: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """[S, 2] int64 per table row (moeflow.infer.sampling's table; its top_k is ignored: the
    whole row is the candidates): (t, cut), the row's nucleus being its logits of order key
    above t and those at t with an id below cut; (0, 0), every logit, where top_p is 1.
    `argmax_B`: each logits row's argmax (int64, the greedy tokens: the shift). `tickets`:
    int32 zeros, at least S, left at 0 (None: made here). BITS / 4 launches, no host sync."""
    B, V = logits_BV.shape
    if logits_BV.stride(1) != 1 or logits_BV.dtype not in (torch.float32, torch.bfloat16,
                                                           torch.float16):
        raise ValueError(f"nucleus: fp32/bf16/fp16 logits with contiguous rows, got "
                         f"{logits_BV.dtype} {tuple(logits_BV.shape)} strides "
                         f"{logits_BV.stride()}")
    if table_S6.dtype != torch.float64 or table_S6.shape[1:] != (len(TABLE_COLUMNS),) \
            or not table_S6.is_contiguous():
        raise ValueError(f"nucleus: the table must be contiguous float64 [S, "
                         f"{len(TABLE_COLUMNS)}]")
    if argmax_B.dtype != torch.int64 or argmax_B.shape != (B,) or not argmax_B.is_contiguous():
        raise ValueError(f"nucleus: the argmax must be contiguous int64 [{B}]")
    device = logits_BV.device
    S = table_S6.shape[0]
    if tickets is None:
        tickets = torch.zeros(S, dtype=torch.int32, device=device)
    elif tickets.dtype != torch.int32 or tickets.numel() < S or tickets.device != device:
        raise ValueError(f"nucleus: tickets must be int32 zeros, at least {S}, on {device}")
    bounds = torch.empty(S, 2, dtype=torch.int64, device=device)
    if S == 0:
        return bounds
    block = min(INTERPRETER_BLOCK if not logits_BV.is_cuda else BLOCK,
                max(16, next_power_of_2(V)))
    P = cdiv(V, block)
    mass = torch.empty(S, 2, dtype=torch.float32, device=device)
    ge = torch.empty(S, P, 16, dtype=torch.float32, device=device)
    tie_n = torch.empty(S, P, 16, dtype=torch.int32, device=device)
    tie_e = torch.empty(S, P, 16, dtype=torch.float32, device=device)
    bits = 16 if logits_BV.element_size() == 2 else 32
    for shift in range(bits - DIGIT, -1, -DIGIT):
        _level_kernel[(S, P)](logits_BV, logits_BV.stride(0), V, table_S6, argmax_B, bounds,
                              mass, ge, tie_n, tie_e, tickets, P, SHIFT=shift,
                              FIRST=shift == bits - DIGIT, BITS=bits,
                              BLOCK=block, BLOCK_P=next_power_of_2(P), num_warps=NUM_WARPS)
    return bounds
