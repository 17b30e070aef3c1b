"""RMSNorm (and residual add + RMSNorm) as one Triton pass per row, for inference on CUDA.

Why: the plain-torch RMSNorm (moeflow.model.norms.rms_norm) is seven kernels with fp32
temporaries the size of the input (upcast, square, mean, rsqrt, two products, downcast). On a
prefill of 2048 tokens of d_model 2048 that is ~50 MB of traffic per norm instead of the 16 MB
that reading x and writing y need, twice per layer. torch.compile's shape-dynamic twin measured
slower than plain torch at that size (moeflow.ops.backend.FUSE_MAX_ELEMENTS), hence these kernels.
At decode sizes the compiled twin is as fast a norm, but the residual add before it is a kernel
of its own; here it is part of the pass (moeflow.ops.backend.resolve_elementwise_backend).

Same math as the reference: fp32 arithmetic, y = x · rsqrt(mean(x²) + eps) · w, one rounding to
x's dtype at the end; only the order of the fp32 sum differs (last-bit differences, which may
move a bf16 output by one unit). `add_rms_norm` first rounds the residual sum s = x + h to x's
dtype, exactly as the plain `x + h` does, and normalises that rounded s.

Forward only (no autograd): moeflow.ops.backend.resolve_elementwise_backend never picks these under
autograd. Legend: R rows (all leading dims), D normalised dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import next_power_of_2
from moeflow.ops.pdl import (launch_next, pdl_launch, prefetch_l2, prefetchable,
                             wait_for_previous)


@triton.jit
def residual_sum(x, h):
    """x + h in fp32, rounded to x's dtype: the residual stream's update, as the plain `x + h`."""
    return (x.to(tl.float32) + h.to(tl.float32)).to(x.dtype)


@triton.jit
def rms_scale(xf, w, D, eps, AXIS: tl.constexpr):
    """xf · rsqrt(mean(xf²) + eps) · w in fp32, the mean over xf's AXIS (its last: 0 for one
    row, 1 for a tile of rows) of D values; w [D] in fp32. The norm's arithmetic, shared by
    this module's kernel and the decode router's (moeflow.ops.decode_route_fused_triton)."""
    r = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=AXIS) / D + eps)
    return xf * tl.expand_dims(r, AXIS) * w


@triton.jit
def _rms_norm_kernel(x_ptr, h_ptr, w_ptr, s_ptr, y_ptr, row_ptr, kept_ptr, cw_ptr, D, eps,
                     HAS_RESIDUAL: tl.constexpr, COMBINE_K: tl.constexpr,
                     BLOCK: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """Row `row`: y = rms_norm(x [+ h]) · w; with HAS_RESIDUAL also s = x + h (rounded to x's
    dtype) stored. COMBINE_K > 0: h is a MoE combine, Σ_k kept · (weight · y_ND[row_TK]) over
    that many choices, as permute_triton's _sum_rows_kernel sums it (each product rounded to
    the rows' dtype, fp32 sum in k order, one rounding); h_ptr holds y_ND. PREFETCH (with
    PDL): the weight, which no kernel writes, is prefetched to L2 before the wait."""
    if PREFETCH:
        prefetch_l2(w_ptr, D)
    wait_for_previous(PDL)
    # The next kernel (a projection) in at once: its programs become resident on idle SMs while
    # this one-row pass runs (batch-1 decode qkv end step 6.6 -> 6.1 µs, session 33).
    launch_next(PDL)
    row = tl.program_id(0).to(tl.int64)
    d = tl.arange(0, BLOCK)
    m = d < D
    x = tl.load(x_ptr + row * D + d, mask=m, other=0.0)
    # Issued with x's load, not after the sum of squares: one trip to memory fewer in the chain
    # (with the prefetch, the batch-1 decode norm's end step 2.60 -> 2.14-2.20 µs, session 32).
    w = tl.load(w_ptr + d, mask=m, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        if COMBINE_K > 0:
            acc = tl.zeros([BLOCK], tl.float32)
            for k in tl.static_range(COMBINE_K):
                src = tl.load(row_ptr + row * COMBINE_K + k)
                kept = tl.load(kept_ptr + row * COMBINE_K + k) != 0
                y = tl.load(h_ptr + src * D + d, mask=m & kept, other=0.0)
                c = tl.load(cw_ptr + row * COMBINE_K + k).to(y.dtype).to(tl.float32)
                acc += (y.to(tl.float32) * c).to(y.dtype).to(tl.float32)
            h = acc.to(h_ptr.dtype.element_ty)
        else:
            h = tl.load(h_ptr + row * D + d, mask=m, other=0.0)
        s = residual_sum(x, h)
        tl.store(s_ptr + row * D + d, s, mask=m)
        x = s
    y = rms_scale(x.to(tl.float32), w, D, eps, 0)
    tl.store(y_ptr + row * D + d, y.to(y_ptr.dtype.element_ty), mask=m)


def _launch(x: torch.Tensor, h: torch.Tensor | None, weight: torch.Tensor, eps: float,
            combine: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
            out: tuple[torch.Tensor, torch.Tensor] | None = None
            ) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`combine`: (row_TK, weights_TK, kept_TK as int8) when h is a MoE combine's y_ND; `out`:
    contiguous (s, y) to write (with h) instead of new tensors."""
    D = x.shape[-1]
    x_RD = x.reshape(-1, D).contiguous()
    h_RD = None if h is None else h.reshape(-1, D).contiguous()
    if out is None:
        y_RD = torch.empty_like(x_RD)
        s_RD = None if h is None else torch.empty_like(x_RD)
    else:
        s_RD, y_RD = (t.view(x_RD.shape) for t in out)
    R = x_RD.shape[0]
    block = next_power_of_2(D)
    row_TK, w_TK, kept_TK = combine if combine is not None else (x_RD, x_RD, x_RD)
    if R:
        weight = weight.contiguous()
        _rms_norm_kernel[(R,)](x_RD, x_RD if h_RD is None else h_RD, weight,
                               y_RD if s_RD is None else s_RD, y_RD, row_TK, kept_TK, w_TK, D,
                               float(eps), HAS_RESIDUAL=h is not None,
                               COMBINE_K=0 if combine is None else row_TK.shape[1], BLOCK=block,
                               PREFETCH=prefetchable(weight, D),
                               num_warps=min(16, max(1, block // 256)), **pdl_launch(x_RD))
    return (None if s_RD is None else s_RD.view(x.shape)), y_RD.view(x.shape)


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, fp32 math, returned in x's dtype."""
    return _launch(x, None, weight, eps)[1]


def add_rms_norm_triton(x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, rms_norm(s)) with s = x + h rounded to x's dtype (the residual stream's update)."""
    _check_residual(x, h)
    return _launch(x, h, weight, eps)


def _check_residual(x: torch.Tensor, h: torch.Tensor) -> None:
    if h.shape != x.shape or h.dtype != x.dtype:
        raise ValueError(f"add_rms_norm: residual {tuple(h.shape)} {h.dtype} does not match "
                         f"{tuple(x.shape)} {x.dtype}")


@dataclass(frozen=True)
class PendingAddNorm:
    """add_rms_norm_triton(x, h, weight, eps) not yet run: its outputs s (the residual stream's
    update) and y (the normalised s) are allocated, contiguous, shaped like x, and unwritten.
    The MoE router's decode kernel writes both in its own launch, where it computes the
    routing logits from y (moeflow.ops.decode_route_fused_triton.route_decode_fused: one launch and
    one kernel boundary fewer per decode layer); any other consumer calls run() before it
    reads them. Made by moeflow.model.norms.pending_add_norm."""

    x: torch.Tensor
    h: torch.Tensor
    weight: torch.Tensor
    eps: float
    s: torch.Tensor
    y: torch.Tensor

    @classmethod
    def of(cls, x: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, eps: float
           ) -> PendingAddNorm:
        _check_residual(x, h)
        x = x.contiguous()
        return cls(x, h.contiguous(), weight.contiguous(), float(eps), torch.empty_like(x),
                   torch.empty_like(x))

    def run(self) -> None:
        """Write s and y by add_rms_norm_triton's pass."""
        _launch(self.x, self.h, self.weight, self.eps, out=(self.s, self.y))


def add_combine_rms_norm_triton(x: torch.Tensor, y_ND: torch.Tensor, row_TK: torch.Tensor,
                                weights_TK: torch.Tensor, kept_TK: torch.Tensor,
                                weight: torch.Tensor, eps: float
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """add_rms_norm_triton(x, h) with h the MoE combine of y_ND (Σ_k kept · weight ·
    y_ND[row_TK], permute_triton.combine_triton's bits) computed in the same pass: x [..., D]
    with T·D elements, row_TK / weights_TK / kept_TK [T, K]."""
    T, K = row_TK.shape
    if x.numel() != T * x.shape[-1] or y_ND.shape[-1] != x.shape[-1] or y_ND.dtype != x.dtype:
        raise ValueError(f"add_combine_rms_norm: rows {tuple(y_ND.shape)} {y_ND.dtype} for "
                         f"{T} tokens do not match x {tuple(x.shape)} {x.dtype}")
    return _launch(x, y_ND, weight, eps, combine=(row_TK.contiguous(), weights_TK.contiguous(),
                                                  kept_TK.contiguous().view(torch.int8)))
