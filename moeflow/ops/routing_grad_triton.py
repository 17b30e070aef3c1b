"""The backward of every Triton router, one launch: d logits from the gradients of the routing
weights and of the losses (aux and z), the scores recomputed from the logits
(moeflow.ops.routing_choice_triton). Autograd reaches it through the fused multi-kernel
router's Function (moeflow.ops.routing_triton) and the one-launch router's
(moeflow.ops.decode_route_triton), so both train alike.

Per token: the weights' gradient through the scaling, the renormalisation over the kept choices
(where the router renormalises: all K when dropless, the kept ones after a capacity's drops,
DeepSpeed's top-2) and the drop mask, onto the chosen scores; the
balance loss's onto every probability, f_e from the counts the loss used (`balance_E`); the
z-loss's onto the softmax; then through softmax or sigmoid onto the logits. A non-finite logit
gets no gradient, as torch.nan_to_num's backward gives it.

Legend: T tokens, E experts, K top-k.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moeflow.config import RouterConfig
from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.routing_choice_triton import (finite_logits, route_block_t, scores,
                                               token_tile)


@triton.jit
def _route_bwd_kernel(logits_ptr, ids_ptr, kept_ptr, gw_ptr, gloss_ptr, balance_ptr,
                      dlogits_ptr, T, E, routed_scaling, aux_coef, z_coef,
                      K: tl.constexpr, SOFTMAX: tl.constexpr, NORMALIZE: tl.constexpr,
                      LOSS_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr):
    """`LOSS_GRAD`: the losses have a gradient at gloss_ptr (else they are unused: zero)."""
    rows, cols, rmask, cmask, offs, m2 = token_tile(tl.program_id(0), T, E, BLOCK_T, BLOCK_E)
    raw = tl.load(logits_ptr + offs, mask=m2, other=0.0)
    x = finite_logits(raw)
    scores_TE, probs, lse, soft = scores(x, cmask, SOFTMAX)
    if LOSS_GRAD:
        g_total = tl.load(gloss_ptr + 2)
        g_aux = tl.load(gloss_ptr) + tl.where(aux_coef != 0.0, aux_coef * g_total, 0.0)
        g_z = tl.load(gloss_ptr + 1) + tl.where(z_coef != 0.0, z_coef * g_total, 0.0)
    else:
        g_aux = tl.full([], 0.0, tl.float32)
        g_z = tl.full([], 0.0, tl.float32)

    # d weights → d selected scores (through the renormalisation over the kept routes, the
    # scaling and the drop mask).
    s_sum = tl.zeros([BLOCK_T], tl.float32)
    gs_sum = tl.zeros([BLOCK_T], tl.float32)
    for k in tl.static_range(K):
        idx = tl.load(ids_ptr + rows * K + k, mask=rmask, other=0)
        s_k = tl.sum(tl.where(cols[None, :] == idx[:, None], scores_TE, 0.0), axis=1)
        kept = tl.load(kept_ptr + rows * K + k, mask=rmask, other=0) != 0
        g_k = tl.where(kept, tl.load(gw_ptr + rows * K + k, mask=rmask, other=0.0), 0.0)
        g_k = g_k * routed_scaling
        s_sum += tl.where(kept, s_k, 0.0)
        gs_sum += g_k * s_k
    denom = tl.maximum(s_sum, 1.1920928955078125e-07)
    ds = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for k in tl.static_range(K):
        idx = tl.load(ids_ptr + rows * K + k, mask=rmask, other=0)
        kept = tl.load(kept_ptr + rows * K + k, mask=rmask, other=0) != 0
        g_k = tl.where(kept, tl.load(gw_ptr + rows * K + k, mask=rmask, other=0.0), 0.0)
        g_k = g_k * routed_scaling
        if NORMALIZE:  # a dropped route's weight is 0 whatever its score: no gradient
            g_k = tl.where(kept, g_k / denom - tl.where(s_sum >= 1.1920928955078125e-07,
                                                        gs_sum / (denom * denom), 0.0), 0.0)
        ds += tl.where(cols[None, :] == idx[:, None], g_k[:, None], 0.0)

    # aux = E/T · Σ_e f_e Σ_t probs_te, f_e = balance_e / Σ balance.
    balance_i = tl.load(balance_ptr + cols, mask=cmask, other=0)
    balance = balance_i.to(tl.float32)
    total = tl.maximum(tl.sum(balance_i), 1).to(tl.float32)
    dprobs = g_aux * E * balance / total / tl.maximum(T, 1)
    dprobs = tl.where(m2, dprobs[None, :] + tl.zeros([BLOCK_T, BLOCK_E], tl.float32), 0.0)
    if SOFTMAX:
        ds += dprobs
        dx = scores_TE * (ds - tl.sum(ds * scores_TE, axis=1)[:, None])
    else:
        q_raw = tl.sum(scores_TE, axis=1)
        q = tl.maximum(q_raw, 1e-20)
        corr = tl.where(q_raw >= 1e-20, tl.sum(dprobs * scores_TE, axis=1) / (q * q), 0.0)
        ds += dprobs / q[:, None] - corr[:, None]
        dx = ds * scores_TE * (1.0 - scores_TE)
    dz = tl.where(g_z != 0.0, g_z * 2.0 * lse / tl.maximum(T, 1), 0.0)  # lse may overflow
    dx += dz[:, None] * soft
    finite = (raw == raw) & (raw < float("inf")) & (raw > float("-inf"))
    tl.store(dlogits_ptr + offs, tl.where(finite, dx, 0.0), mask=m2)


def route_logits_grad(logits_TE: torch.Tensor, ids_TK: torch.Tensor, kept_i8: torch.Tensor,
                      balance_E: torch.Tensor, g_w: torch.Tensor | None,
                      g_losses: torch.Tensor | None, cfg: RouterConfig) -> torch.Tensor | None:
    """The logits' gradient from the routing weights' and the losses' (either may be None:
    unused), in one launch: the backward of every Triton router, whose weights are each
    token's chosen scores, renormalised over its kept routes where the config normalises (all
    of them when dropless) and scaled by routed_scaling. `balance_E`: the counts the balance
    loss used (read only when the losses have a gradient)."""
    if g_w is None and g_losses is None:
        return None
    T, E = logits_TE.shape
    if g_w is None:
        g_w = logits_TE.new_zeros(ids_TK.shape)
    d_logits = torch.empty_like(logits_TE)
    if T > 0:
        grid, block_t, block_e = _tiles(T, E)
        loss_grad = g_losses is not None
        _route_bwd_kernel[grid](
            logits_TE, ids_TK, kept_i8, g_w.contiguous(),
            g_losses.contiguous() if loss_grad else g_w, balance_E, d_logits, T, E,
            float(cfg.routed_scaling), float(cfg.aux_loss_coef), float(cfg.z_loss_coef),
            K=cfg.top_k, SOFTMAX=cfg.score_func == "softmax", NORMALIZE=cfg.normalizes,
            LOSS_GRAD=loss_grad, BLOCK_T=block_t, BLOCK_E=block_e, num_warps=4)
    return d_logits


@functools.lru_cache(maxsize=1024)
def _tiles(T: int, E: int) -> tuple[tuple[int], int, int]:
    """(grid, BLOCK_T, BLOCK_E) of the backward over [T, E] logits: route_block_t tokens per
    program; cached per shape (asked on every training layer call)."""
    block_t = route_block_t(E, T)
    return (cdiv(T, block_t),), block_t, next_power_of_2(E)
