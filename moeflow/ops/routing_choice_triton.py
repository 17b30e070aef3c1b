"""What every Triton router computes per token: finite logits, the scores, and the top-k
choice, written once so that each router chooses alike (bit for bit under the interpreter):
the fused multi-kernel router's top-k kernel (moeflow.ops.routing_triton), the one-launch
router (moeflow.ops.decode_route_triton and its fused-logits kernel) and the routers' backward
(moeflow.ops.routing_grad_triton), which recomputes the scores.

`choose_tile` picks by repeated arg-max (ties → lower expert index) over what the reference's
`select_experts` ranks by (SEL_*): the scores (with the expert bias within the best groups,
DeepSeek), the logits with Gumbel noise for every choice ("rsample"), or DeepSpeed's rule: the
probabilities for the first choice and the logits for later ones.

Legend: T tokens, E experts, K top-k, G expert groups.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moeflow.ops.grid import cdiv, next_power_of_2

# What the choices are ranked by: the scores, the logits with noise, DeepSpeed's rule.
SEL_SCORES, SEL_NOISY_LOGITS, SEL_DEEPSPEED = 0, 1, 2


@triton.jit
def token_tile(pid, T, E, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """Program `pid`'s [BLOCK_T, BLOCK_E] tile of a row-major [T, E] logits array: its rows,
    the expert columns, their masks, the element offsets and the 2-D mask."""
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    rmask = rows < T
    cmask = cols < E
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    return rows, cols, rmask, cmask, offs, rmask[:, None] & cmask[None, :]


@triton.jit
def finite_logits(x):
    x = tl.where(x != x, -3.4028234663852886e38, x)
    return tl.minimum(tl.maximum(x, -3.4028234663852886e38), 3.4028234663852886e38)


@triton.jit
def scores(x, cmask, SOFTMAX: tl.constexpr):
    """Returns (scores, balance probabilities, logsumexp, softmax) for a [BT, BE] logits tile."""
    xm = tl.where(cmask[None, :], x, float("-inf"))
    mx = tl.max(xm, axis=1)
    ex = tl.exp(xm - mx[:, None])
    den = tl.sum(ex, axis=1)
    soft = ex / den[:, None]
    lse = mx + tl.log(den)
    if SOFTMAX:
        s = soft
        probs = soft
    else:
        s = tl.where(cmask[None, :], tl.sigmoid(x), 0.0)
        probs = s / tl.maximum(tl.sum(s, axis=1), 1e-20)[:, None]
    return s, probs, lse, soft


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
    scores_TE, probs, lse, soft = scores(x, cmask, SOFTMAX)
    if SEL == 1:
        sel = xr
    else:
        sel = scores_TE
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
        _, idx, w = tl.reduce((cand, tl.broadcast_to(cols[None, :], cand.shape), scores_TE),
                              axis=1, combine_fn=_first_largest)
        hit = cols[None, :] == idx[:, None]
        taken = taken | hit
        ids_tile = tl.where(kcols[None, :] == k, idx.to(tl.int64)[:, None], ids_tile)
        w_tile = tl.where(kcols[None, :] == k, w[:, None], w_tile)
    if NORMALIZE:
        w_tile = w_tile / tl.maximum(tl.sum(w_tile, axis=1), 1.1920928955078125e-07)[:, None]
    w_tile = w_tile * routed_scaling
    return ids_tile, w_tile, lse, probs, taken & cmask[None, :]


def route_block_t(E: int, T: int) -> int:
    """Tokens per routing program: a [BLOCK_T, E] tile of at most 4096 scores (larger tiles
    spill registers: 64 × 128 took 77 µs for one program on an H100), and few enough tokens that
    small batches still spread over the SMs instead of one program doing all the work."""
    cap = max(2, min(16, 4096 // next_power_of_2(E)))
    spread = next_power_of_2(max(1, cdiv(T, 264)))  # ≥ 2 programs per SM when T allows
    return max(2, min(cap, spread))
