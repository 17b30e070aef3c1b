"""The sampled rows of a decode step drawn in one Triton launch: temperature, top-k, top-p and the
Gumbel-max draw over each row's candidates (moeflow.infer.sampling, whose `draw_reference` this
is: the same operations, log1p taken here by Kahan's identity; exp, log and division may differ
in their last bits, so a token may differ where two scores are that close, ~1e-6 apart).

Why: drawn with torch ops one row at a time, a sampled row cost 16-19 kernels (cast, max,
divide, top-k, sort, softmaxes, cumsum, scatter, multinomial) after the decode graph, 305 for a
16-row step with top-k and top-p (benchmarks/NOTES-infer.md, "Sampled decode"); here the batch's
candidates come from one top-k or sort (moeflow.infer.sampling.ranked_candidates) and one
launch does the rest. Two draw kernels, by how the candidates come:

- ranked (a top-k or a sort, best first, ties to the lower id): one program per sampled row,
  its table row (temperature, k, p, the draw's key, the logits row) saying what to do, the
  candidates read in tiles of BLOCK: with `TOP_P` a pass for the mass of the k best (the
  softmax's denominator); then x = (value - best) / temperature (0 where NaN: tied infinite
  maxima, a row of -inf, NaN logits), kept while within the k best and, with top-p, while the
  mass before it is below p of the total (a running sum carried across tiles: the loop ends at
  the tile where it reaches the limit); the row's token is the kept candidate with the largest
  x + g, g the Gumbel noise of its id under the draw's key
  (moeflow.infer.sampling.gumbel_noise's hash, in uint32 arithmetic);
- whole rows (no top-k: a temperature alone, the default request, or a top-p whose nucleus
  moeflow.ops.nucleus_triton bounded without a sort): nothing needs order, so the vocabulary
  is cut into tiles, one program per (row, tile) finds its tile's best x + g among the logits
  kept (the shift read at the row's argmax, the greedy token the caller has), and the last
  program of the row to arrive (moeflow.ops.tickets) reduces the tiles' bests: one round of
  loads over the GPU rather than one program's passes over 151,936 logits.

The token goes to out[row]; rows not in the table keep what out holds (the greedy tokens).

A top-k's candidates come ranked from one more launch (moeflow.ops.top_k_triton).

Legend: S sampled rows, B logits rows, N candidates per row, P tiles per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.infer.sampling import HASH_MUL_1, HASH_MUL_2, TABLE_COLUMNS
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.tickets import last_to_arrive
from moeflow.ops.top_k_triton import order_key

BLOCK = 2048  # candidates per tile (a 151,936-token row: 75 tiles)
INTERPRETER_BLOCK = 16  # the CPU tests' tiles: several per row
_NO_ID = tl.constexpr(2147483647)
_MUL_1 = tl.constexpr(HASH_MUL_1)
_MUL_2 = tl.constexpr(HASH_MUL_2)


@triton.jit
def _hash32(x):
    x = x ^ (x >> 16)
    x = x * tl.full([], _MUL_1, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full([], _MUL_2, tl.uint32)
    return x ^ (x >> 15)


@triton.jit
def _gumbel(ids, key_lo, key_hi):
    """gumbel_noise of int64 ids < 2^32 under the key's uint32 halves (uint32 products wrap,
    as the reference's masked int64 products do)."""
    h = _hash32(_hash32(ids.to(tl.uint32) ^ key_lo) ^ key_hi)
    scale = 2.3283064365386963e-10  # 2^-32
    low = (h >> 31) == 0
    w = ((h ^ tl.full([], 4294967295, tl.uint32)).to(tl.float32) + 0.5) * scale  # 2^32-1-h
    u = tl.where(low, (h.to(tl.float32) + 0.5) * scale, 1.0 - w)
    e = -tl.log(u)
    e = tl.where(low, e, tl.where(u == 1.0, w, e * (w / (1.0 - u))))
    return -tl.log(e)


@triton.jit
def scaled(v, top, temperature):
    """x = (v - top) / temperature in fp32, 0 where NaN (inf - inf: tied infinite maxima, a row
    of -inf; NaN logits): what every draw, and the nucleus's masses, are made of."""
    x = (v.to(tl.float32) - top) / temperature
    return tl.where(x != x, 0.0, x)


@triton.jit
def _draw_ranked_kernel(val_ptr, stride_v, id_ptr, stride_i, table_ptr, out_ptr, N,
                        TOP_P: tl.constexpr, BLOCK: tl.constexpr):
    """Candidates best first (a top-k or a sort): one program per sampled row."""
    s = tl.program_id(0)
    temperature = tl.load(table_ptr + s * 6).to(tl.float32)
    k = tl.load(table_ptr + s * 6 + 1).to(tl.int32)
    p = tl.load(table_ptr + s * 6 + 2).to(tl.float32)
    key_lo = tl.load(table_ptr + s * 6 + 3).to(tl.int64).to(tl.uint32)
    key_hi = tl.load(table_ptr + s * 6 + 4).to(tl.int64).to(tl.uint32)
    row = tl.load(table_ptr + s * 6 + 5).to(tl.int64)
    vals = val_ptr + row * stride_v
    offs = tl.arange(0, BLOCK)
    top = tl.load(vals).to(tl.float32)
    n = tl.where((k > 0) & (k < N), k, N)
    limit = float("inf")
    if TOP_P:
        mass = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            j = start + offs
            v = tl.load(vals + j, mask=j < n, other=float("-inf"))
            mass += tl.where(j < n, tl.exp(scaled(v, top, temperature)), 0.0)
        limit = tl.where(p < 1.0, tl.sum(mass, axis=0) * p, float("inf"))
    carried = tl.zeros([], tl.float32)
    best_score = float("-inf")
    best_id = tl.load(id_ptr + row * stride_i).to(tl.int64)  # kept whatever the scores
    start = 0
    # Past the tile where the mass before a candidate reaches the limit nothing more is kept:
    # a top-p row stops there (its nucleus), not at the end of its sorted vocabulary.
    while (start < n) & (carried < limit):
        j = start + offs
        valid = j < n
        v = tl.load(vals + j, mask=valid, other=float("-inf"))
        x = scaled(v, top, temperature)
        keep = valid
        if TOP_P:
            e = tl.where(valid, tl.exp(x), 0.0)
            before = carried + tl.cumsum(e, axis=0) - e
            keep = keep & (before < limit)
            carried += tl.sum(e, axis=0)
        ids = tl.load(id_ptr + row * stride_i + j, mask=valid, other=0).to(tl.int64)
        score = tl.where(keep, x + _gumbel(ids, key_lo, key_hi), float("-inf"))
        tile_best = tl.max(score, axis=0)
        at = tl.min(tl.where(score == tile_best, offs, _NO_ID), axis=0)
        tile_id = tl.sum(tl.where(offs == at, ids, 0), axis=0)
        better = tile_best > best_score
        best_id = tl.where(better, tile_id, best_id)
        best_score = tl.where(better, tile_best, best_score)
        start += BLOCK
    tl.store(out_ptr + row, best_id)


@triton.jit
def _draw_whole_rows_kernel(val_ptr, stride_v, V, table_ptr, argmax_ptr, bounds_ptr, score_ptr,
                            at_ptr, out_ptr, tickets_ptr, P, BOUNDED: tl.constexpr,
                            BITS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_P: tl.constexpr):
    """Every row's whole vocabulary: one program per (sampled row, tile) finds its tile's best
    x + g, the last of the row's P to arrive (moeflow.ops.tickets) the row's. The shift is the
    row's maximum, read at its argmax (the greedy token). BOUNDED: only the row's nucleus is
    drawn from, the logits of order key above bounds[s, 0] and those at it with an id below
    bounds[s, 1] (moeflow.ops.nucleus_triton)."""
    s = tl.program_id(0)
    t = tl.program_id(1)
    temperature = tl.load(table_ptr + s * 6).to(tl.float32)
    key_lo = tl.load(table_ptr + s * 6 + 3).to(tl.int64).to(tl.uint32)
    key_hi = tl.load(table_ptr + s * 6 + 4).to(tl.int64).to(tl.uint32)
    row = tl.load(table_ptr + s * 6 + 5).to(tl.int64)
    argmax = tl.load(argmax_ptr + row)
    top = tl.load(val_ptr + row * stride_v + argmax).to(tl.float32)
    offs = t * BLOCK + tl.arange(0, BLOCK)
    valid = offs < V
    v = tl.load(val_ptr + row * stride_v + offs, mask=valid, other=float("-inf"))
    x = scaled(v, top, temperature)
    keep = valid
    if BOUNDED:
        key = order_key(v, valid, BITS).to(tl.int64)
        t_key = tl.load(bounds_ptr + s * 2)
        keep = valid & ((key > t_key) | ((key == t_key) & (offs < tl.load(bounds_ptr + s * 2 + 1))))
    score = tl.where(keep, x + _gumbel(offs.to(tl.int64), key_lo, key_hi), float("-inf"))
    best = tl.max(score, axis=0)
    # A kept offset only: with NaN logits the max may be the padding's -inf.
    at = tl.min(tl.where((score == best) & keep, offs, _NO_ID), axis=0)
    tl.store(score_ptr + s * P + t, best)
    tl.store(at_ptr + s * P + t, at)
    if last_to_arrive(tickets_ptr + s, P):
        ps = tl.arange(0, BLOCK_P)
        pmask = ps < P
        # Through L2 (.cg): the other programs' partials, not this SM's L1 copy.
        scores = tl.load(score_ptr + s * P + ps, mask=pmask, other=float("-inf"),
                         cache_modifier=".cg")
        ats = tl.load(at_ptr + s * P + ps, mask=pmask, other=_NO_ID, cache_modifier=".cg")
        best = tl.max(scores, axis=0)
        at = tl.min(tl.where(scores == best, ats, _NO_ID), axis=0)  # ties: the lowest id
        # No score at all (NaN logits): the greedy token, never an id outside the vocabulary.
        tl.store(out_ptr + row, tl.where(at == _NO_ID, argmax, at.to(tl.int64)))


def draw_triton(values_BN: torch.Tensor, ids_BN: torch.Tensor | None, table_S6: torch.Tensor,
                out_B: torch.Tensor, *, ranked: bool, top_p: bool,
                argmax_B: torch.Tensor | None = None,
                tickets: torch.Tensor | None = None,
                bounds_S2: torch.Tensor | None = None) -> torch.Tensor:
    """moeflow.infer.sampling.draw_reference as one launch (same arguments; returns out_B).
    Whole rows (not `ranked`) also need each row's argmax (`argmax_B`, int64, the greedy
    tokens) and are drawn by the tiled kernel, whose `tickets` are int32 zeros, at least S
    (moeflow.ops.tickets; None: made here); with top_p, their nuclei's bounds
    (moeflow.ops.nucleus_triton.nucleus_bounds_triton, `bounds_S2`)."""
    if values_BN.dim() != 2 or values_BN.stride(1) != 1 or not values_BN.is_floating_point():
        raise ValueError("draw: candidates must be [B, N] floating point, rows contiguous")
    if table_S6.dtype != torch.float64 or table_S6.shape[1:] != (len(TABLE_COLUMNS),):
        raise ValueError(f"draw: the table must be float64 [S, {len(TABLE_COLUMNS)}]")
    S, N = table_S6.shape[0], values_BN.shape[1]
    if S == 0:
        return out_B
    if ids_BN is not None and (ids_BN.shape != values_BN.shape or ids_BN.stride(1) != 1):
        raise ValueError("draw: candidate ids must match the values' shape, rows contiguous")
    interpreting = not values_BN.is_cuda
    block = min(INTERPRETER_BLOCK if interpreting else BLOCK, max(16, next_power_of_2(N)))
    table_S6 = table_S6.contiguous()
    if not ranked:
        if argmax_B is None or argmax_B.dtype != torch.int64 or not argmax_B.is_contiguous():
            raise ValueError("draw: whole rows need their argmax (contiguous int64)")
        if tickets is None:
            tickets = torch.zeros(S, dtype=torch.int32, device=values_BN.device)
        elif (tickets.dtype != torch.int32 or tickets.numel() < S
              or tickets.device != values_BN.device):
            raise ValueError(f"draw: tickets must be int32 zeros, at least {S}, on "
                             f"{values_BN.device}")
        if top_p and (bounds_S2 is None or bounds_S2.shape != (S, 2)
                      or bounds_S2.dtype != torch.int64 or not bounds_S2.is_contiguous()):
            raise ValueError(f"draw: top-p over whole rows needs their nuclei's bounds "
                             f"(contiguous int64 [{S}, 2])")
        P = cdiv(N, block)
        score_SP = torch.empty(S, P, dtype=torch.float32, device=values_BN.device)
        at_SP = torch.empty(S, P, dtype=torch.int32, device=values_BN.device)
        _draw_whole_rows_kernel[(S, P)](values_BN, values_BN.stride(0), N, table_S6, argmax_B,
                                        bounds_S2, score_SP, at_SP, out_B, tickets, P,
                                        BOUNDED=top_p, BITS=8 * values_BN.element_size(),
                                        BLOCK=block, BLOCK_P=next_power_of_2(P), num_warps=8)
        return out_B
    if ids_BN is None:
        raise ValueError("draw: ranked candidates need their token ids")
    _draw_ranked_kernel[(S,)](values_BN, values_BN.stride(0), ids_BN, ids_BN.stride(0),
                              table_S6, out_B, N, TOP_P=top_p, BLOCK=block,
                              num_warps=4 if block <= 256 else 8)
    return out_B
