"""Each row's k best logits in a total order, in one Triton launch: the candidates a top-k
sampler draws from (moeflow.infer.sampling.ranked_candidates, whose torch path is the
reference: a top-k of integer order keys, its tie group refilled with the lowest ids, a stable
sort).

The order: the value (NaN above everything, -0 equal to +0), then the lower id, so the kept set
and its order depend neither on how torch breaks ties (with bf16 logits tokens tie at a row's
k-th value in most rows) nor on the batch. Returned best first, values in the logits' dtype.

Why one launch: torch.topk over a 151,936-token row is about sixteen small kernels (a radix
select's digit counts and scans, a gather, a sort), ~60 µs a step at batch 1 on an H200, and the
tie refill and order took one more program that scanned the row (15-28 µs; session 41,
benchmarks/results/decode_served). Here:

1. one program per (row, tile of TILE logits): each logit becomes an unsigned key in the order
   above (`order_key`: the value's bits, BITS = 16 for bf16 and fp16, 32 for fp32); the tile's
   k-th largest key by a bitwise search (`_kth_largest`: BITS counting passes over the tile in
   registers), and the tile's k best (every larger key, then the tied ones in id order) written
   to the row's candidate list, in id order;
2. the last of the row's programs to arrive (moeflow.ops.tickets) takes the same two steps over
   the row's T·k candidates (the row's k best are among them: each is among its tile's k best),
   then sorts the k by one int64 key (the order key, then the id) and writes ids and values.

Measured in the served Qwen3-30B-A3B step (H100, session 41): 15 µs at batch 1, 31 µs at 16.

TILE is chosen so that a row's candidates stay within MAX_CANDIDATES (one program holds them in
registers): 4,096 logits for k up to 215 at Qwen3's vocabulary (38 programs a row, 1,520
candidates at k = 40), larger tiles for larger k, up to MAX_K.

Legend: B rows, V logits per row, T tiles per row, C = T·k candidates per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.tickets import last_to_arrive

MAX_K = 1024  # the most candidates a row may ask for (more: torch's topk path)
TILE = 4096  # logits per program, at least (a 151,936-token row: 38 tiles)
INTERPRETER_TILE = 16  # the CPU tests' tiles: several per row
MAX_CANDIDATES = 8192  # a row's tiles' candidates, held by one program


@triton.jit
def order_key(x, valid, BITS: tl.constexpr):
    """uint32 keys of values x in the total order (larger value, larger key; -0 as +0; NaN
    above +inf), 0 where not `valid` (below every value): the value's bits with the magnitude of
    negatives flipped, offset to unsigned, in [1, 2^BITS)."""
    f = x.to(tl.float32)
    if BITS == 16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)
        magnitude = 32767
    else:
        bits = x.to(tl.int32, bitcast=True)
        magnitude = 2147483647
    ordered = tl.where(bits >= 0, bits, bits ^ magnitude)
    ordered = tl.where((bits & magnitude) == 0, 0, ordered)  # ±0 by its bits: no flush to zero
    ordered = tl.where(f != f, magnitude, ordered)
    if BITS == 16:
        u = (ordered + 32768).to(tl.uint32, bitcast=True)
    else:
        u = ordered.to(tl.uint32, bitcast=True) ^ tl.full([], 2147483648, tl.uint32)
    return tl.where(valid, u, 0)


@triton.jit
def _signed(u, BITS: tl.constexpr):
    """order_key's keys back to signed (the same order)."""
    if BITS == 16:
        ordered = u.to(tl.int32, bitcast=True) - 32768
    else:
        ordered = (u ^ tl.full([], 2147483648, tl.uint32)).to(tl.int32, bitcast=True)
    return ordered


@triton.jit
def _kth_largest(u, k, BITS: tl.constexpr):
    """The k-th largest of the keys u (at least k of them): the largest t with k keys >= t,
    built one bit at a time from the top."""
    t = tl.zeros([], tl.uint32)
    for i in tl.static_range(BITS):
        c = t | tl.full([], 1 << (BITS - 1 - i), tl.uint32)
        n = tl.sum((u >= c).to(tl.int32), axis=0)
        t = tl.where(n >= k, c, t)
    return t


@triton.jit
def _first_k(u, kth, k):
    """The k best keys as a mask: every key above the k-th, then the tied ones in lane order;
    with their write positions (rank among the k, in lane order)."""
    above = u > kth
    tied = (u == kth).to(tl.int32)
    rank = tl.cumsum(tied, axis=0)  # among the ties, from 1
    keep = above | ((tied > 0) & (rank <= k - tl.sum(above.to(tl.int32), axis=0)))
    return keep, tl.cumsum(keep.to(tl.int32), axis=0) - 1


@triton.jit
def _top_k_kernel(x_ptr, stride_x, V, K, cand_key_ptr, cand_id_ptr, tickets_ptr, T,
                  out_val_ptr, out_id_ptr, TILE: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_K: tl.constexpr, BITS: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    row = x_ptr + b * stride_x
    at = t * TILE + tl.arange(0, TILE)
    valid = at < V
    u = order_key(tl.load(row + at, mask=valid, other=0.0), valid, BITS)
    tile_keep, tile_pos = _first_k(u, _kth_largest(u, K, BITS), K)
    cands = (b * T + t) * K
    tl.store(cand_key_ptr + cands + tile_pos, u, mask=tile_keep)
    tl.store(cand_id_ptr + cands + tile_pos, at, mask=tile_keep)
    if last_to_arrive(tickets_ptr + b, T):
        c = tl.arange(0, BLOCK_C)
        cmask = c < T * K
        # Through L2 (.cg): the other programs' candidates, not this SM's L1 copy. Padding
        # (and a short last tile's invalid lanes) are key 0: never among the k best of V >= k.
        cu = tl.load(cand_key_ptr + b * T * K + c, mask=cmask, other=0, cache_modifier=".cg")
        cid = tl.load(cand_id_ptr + b * T * K + c, mask=cmask, other=0, cache_modifier=".cg")
        keep, pos = _first_k(cu, _kth_largest(cu, K, BITS), K)
        # The sort key: the order key (back to signed), then the lower id first.
        key = (_signed(cu, BITS).to(tl.int64) << 32) | (4294967295 - cid.to(tl.int64))
        tl.store(out_id_ptr + b * K + pos, key, mask=keep)  # the k, in id order, as scratch
        tl.debug_barrier()
        j = tl.arange(0, BLOCK_K)
        jm = j < K
        key = tl.load(out_id_ptr + b * K + j, mask=jm, other=-9223372036854775808)
        key = tl.sort(key, descending=True)
        ids = 4294967295 - (key & 4294967295)
        tl.debug_barrier()  # every thread has read the keys before they are overwritten
        tl.store(out_id_ptr + b * K + j, ids, mask=jm)
        tl.store(out_val_ptr + b * K + j, tl.load(row + ids, mask=jm, other=0.0), mask=jm)


def top_k_tile(V: int, k: int, interpreting: bool = False) -> int:
    """Logits per program for a top-k of V-logit rows: TILE (INTERPRETER_TILE), or at least k,
    doubled until the row's candidates fit MAX_CANDIDATES (or one tile holds the row)."""
    tile = max(INTERPRETER_TILE if interpreting else TILE, next_power_of_2(k))
    while cdiv(V, tile) * k > MAX_CANDIDATES and tile < V:
        tile *= 2
    return tile


def top_k_triton(logits_BV: torch.Tensor, k: int, tickets: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(values [B, k] in the logits' dtype, ids [B, k] int64) of each row's k best logits, best
    first in the total order of the module docstring; 1 <= k <= min(V, MAX_K), rows
    contiguous, fp32 / bf16 / fp16. `tickets`: int32 zeros, at least B, left at 0
    (moeflow.ops.tickets; None: made here). One launch, no host sync."""
    B, V = logits_BV.shape
    if not 0 < k <= min(V, MAX_K) or logits_BV.stride(1) != 1 \
            or logits_BV.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"top-k: 1 to min(V, {MAX_K}) of fp32/bf16/fp16 logits with contiguous "
                         f"rows, got k {k} of {logits_BV.dtype} {tuple(logits_BV.shape)} "
                         f"strides {logits_BV.stride()}")
    device = logits_BV.device
    if tickets is None:
        tickets = torch.zeros(B, dtype=torch.int32, device=device)
    elif tickets.dtype != torch.int32 or tickets.numel() < B or tickets.device != device:
        raise ValueError(f"top-k: tickets must be int32 zeros, at least {B}, on {device}")
    values = torch.empty(B, k, dtype=logits_BV.dtype, device=device)
    ids = torch.empty(B, k, dtype=torch.int64, device=device)
    if B == 0:
        return values, ids
    tile = top_k_tile(V, k, interpreting=not logits_BV.is_cuda)
    T = cdiv(V, tile)
    cand_keys = torch.empty(B, T * k, dtype=torch.uint32, device=device)
    cand_ids = torch.empty(B, T * k, dtype=torch.int32, device=device)
    block_c = next_power_of_2(T * k)
    _top_k_kernel[(B, T)](logits_BV, logits_BV.stride(0), V, k, cand_keys, cand_ids, tickets, T,
                          values, ids, TILE=tile, BLOCK_C=block_c,
                          BLOCK_K=max(16, next_power_of_2(k)),
                          BITS=16 if logits_BV.element_size() == 2 else 32,
                          num_warps=min(32, max(4, max(tile, block_c) // 512)))
    return values, ids
