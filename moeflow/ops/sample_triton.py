"""The sampled rows of a decode step drawn in one Triton launch: temperature, top-k, top-p and the
Gumbel-max draw over each row's candidates (moeflow.infer.sampling, whose `draw_reference` this
is, operation for operation).

Why: drawn with torch ops one row at a time, a sampled row cost ~20 launches (cast, max,
divide, top-k, sort, softmaxes, cumsum, scatter, multinomial) after the decode graph, ~320 for a
batch of 16 (benchmarks/NOTES-infer.md, "Sampled decode"); here the batch's candidates come from
one top-k or sort (moeflow.infer.sampling.sample_tokens) and this one launch does the rest.

One program per sampled row: the table row (temperature, k, p, the draw's key, the logits row)
gives what to do; the row's candidates are read in tiles of BLOCK, best first when `RANKED`:
  1. the shift: the first candidate when ranked, else a pass for the row's maximum;
  2. with `TOP_P`, a pass for the mass of the k best (the softmax's denominator);
  3. the draw: x = (value - max) / temperature, kept while within the k best and, with top-p,
     while the mass before it is below p of the total (a running sum carried across tiles: the
     loop ends at the tile where it reaches the limit); the row's token is the kept candidate
     with the largest x + g, g the Gumbel noise of its id under the draw's key
     (moeflow.infer.sampling.gumbel_noise's hash, in uint32 arithmetic).
The token goes to out[row]; rows not in the table keep what out holds (the greedy tokens).

Legend: S sampled rows (programs), B logits rows, N candidates per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.infer.sampling import HASH_MUL_1, HASH_MUL_2, TABLE_COLUMNS
from moeflow.ops.grid import next_power_of_2

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
def _draw_kernel(val_ptr, stride_v, id_ptr, stride_i, table_ptr, out_ptr, N,
                 RANKED: tl.constexpr, HAS_IDS: tl.constexpr, TOP_P: tl.constexpr,
                 BLOCK: tl.constexpr):
    s = tl.program_id(0)
    temperature = tl.load(table_ptr + s * 6).to(tl.float32)
    k = tl.load(table_ptr + s * 6 + 1).to(tl.int32)
    p = tl.load(table_ptr + s * 6 + 2).to(tl.float32)
    key_lo = tl.load(table_ptr + s * 6 + 3).to(tl.int64).to(tl.uint32)
    key_hi = tl.load(table_ptr + s * 6 + 4).to(tl.int64).to(tl.uint32)
    row = tl.load(table_ptr + s * 6 + 5).to(tl.int64)
    vals = val_ptr + row * stride_v
    offs = tl.arange(0, BLOCK)
    n = N
    if RANKED:
        top = tl.load(vals).to(tl.float32)
        n = tl.where((k > 0) & (k < N), k, N)
    else:
        best = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, N, BLOCK):
            v = tl.load(vals + start + offs, mask=start + offs < N, other=float("-inf"))
            best = tl.maximum(best, v.to(tl.float32))
        top = tl.max(best, axis=0)
    limit = float("inf")
    if TOP_P:
        mass = tl.zeros([BLOCK], tl.float32)
        for start in range(0, n, BLOCK):
            j = start + offs
            v = tl.load(vals + j, mask=j < n, other=float("-inf")).to(tl.float32)
            mass += tl.where(j < n, tl.exp((v - top) / temperature), 0.0)
        limit = tl.where(p < 1.0, tl.sum(mass, axis=0) * p, float("inf"))
    carried = tl.zeros([], tl.float32)
    best_score = float("-inf")
    if HAS_IDS:
        best_id = tl.load(id_ptr + row * stride_i).to(tl.int64)
    else:
        best_id = tl.zeros([], tl.int64)
    start = 0
    # Past the tile where the mass before a candidate reaches the limit nothing more is kept:
    # a top-p row stops there (its nucleus), not at the end of its sorted vocabulary.
    while (start < n) & (carried < limit):
        j = start + offs
        valid = j < n
        v = tl.load(vals + j, mask=valid, other=float("-inf")).to(tl.float32)
        x = (v - top) / temperature
        keep = valid
        if TOP_P:
            e = tl.where(valid, tl.exp(x), 0.0)
            before = carried + tl.cumsum(e, axis=0) - e
            keep = keep & (before < limit)
            carried += tl.sum(e, axis=0)
        if HAS_IDS:
            ids = tl.load(id_ptr + row * stride_i + j, mask=valid, other=0).to(tl.int64)
        else:
            ids = j.to(tl.int64)
        score = tl.where(keep, x + _gumbel(ids, key_lo, key_hi), float("-inf"))
        tile_best = tl.max(score, axis=0)
        at = tl.min(tl.where(score == tile_best, offs, _NO_ID), axis=0)
        tile_id = tl.sum(tl.where(offs == at, ids, 0), axis=0)
        better = tile_best > best_score
        best_id = tl.where(better, tile_id, best_id)
        best_score = tl.where(better, tile_best, best_score)
        start += BLOCK
    tl.store(out_ptr + row, best_id)


def draw_triton(values_BN: torch.Tensor, ids_BN: torch.Tensor | None, table_S6: torch.Tensor,
                out_B: torch.Tensor, *, ranked: bool, top_p: bool) -> torch.Tensor:
    """moeflow.infer.sampling.draw_reference as one launch (same arguments; returns out_B)."""
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
    ids = values_BN if ids_BN is None else ids_BN  # a placeholder pointer when ids are 0..N-1
    _draw_kernel[(S,)](values_BN, values_BN.stride(0), ids, ids.stride(0), table_S6.contiguous(),
                       out_B, N, RANKED=ranked, HAS_IDS=ids_BN is not None, TOP_P=top_p,
                       BLOCK=block, num_warps=4 if block <= 256 else 8)
    return out_B
