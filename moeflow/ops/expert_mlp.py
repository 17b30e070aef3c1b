"""Grouped expert MLP: every expert's MLP over its contiguous block of expert-sorted rows.

Rows x_ND are sorted by expert; expert e owns rows [ends_E[e-1], ends_E[e]). Rows past ends_E[-1]
(dropped assignments parked at the end, `parked=True`) are not computed: their outputs are zero and
they receive no gradient. torch._grouped_mm leaves such rows uninitialised in its outputs and in
its input gradients, so the grouped path masks them explicitly; garbage there would otherwise
reach the token gradients and the biases.

Legend: N sorted rows, D model dim, F expert ffn dim, I = F or 2F (SwiGLU's gate|up), E experts.
  w_in_EDI, b_in_EI, w_out_EFD, b_out_ED (biases optional).

`expert_mlp_reference` loops over experts with plain matmuls and runs anywhere;
`expert_mlp_grouped_mm` issues two `torch._grouped_mm` calls (no host sync);
`expert_mlp_fp8` issues the same two as FP8 grouped GEMMs (moeflow.ops.fp8_grouped: the
training path of `Backends(matmul="fp8")`; `kernel` chooses torch._scaled_grouped_mm or its
plain-torch reference).
Every implementation takes `rows_N`: when given, x_ND holds the tokens and the sorted rows are
x_ND[rows_N] (moeflow.model.dispatch's deferred gather); these gather first, the Triton
weight-streaming kernel gathers as it loads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeflow.ops.activation import apply_activation
from moeflow.ops.fp8_grouped import fp8_grouped_mm


def row_experts(ends_E: torch.Tensor, rows_N: torch.Tensor) -> torch.Tensor:
    """The expert of each row of an expert-sorted layout (rows past ends_E[-1] get the last)."""
    return torch.searchsorted(ends_E, rows_N, right=True).clamp_max_(ends_E.shape[0] - 1)


def _row_bias(b_EX: torch.Tensor, ends_E: torch.Tensor, num_rows: int,
              expert_N: torch.Tensor | None = None) -> torch.Tensor:
    """b_EX[expert of each row] for rows sorted by expert: [N, X] (rows past the end get the last).
    `expert_N`: row_experts(ends_E, arange(N)), when the caller already has it (one
    searchsorted serves both biases of an MLP).

    Gathered from an fp32 copy, so the backward (a scatter-add of the rows' gradients into the
    bias) accumulates in fp32; scatter-adding a few hundred bf16 rows into bf16 rounds at every
    add (3 % error on the bias gradient, measured on an H200) where the reference's sum over rows
    rounds once. Forward values are unchanged (bf16 → fp32 → bf16 is exact).

    `index_select`, not `b[idx]`: the backward of advanced indexing is CUDA's sort-based
    accumulate kernel, which serialises duplicate indices — here every row of an expert — and
    took 100 of moe-S's 153 ms per training step on an H200; index_select's backward is an
    index_add (atomic adds on CUDA, deterministic on CPU under deterministic mode)."""
    if expert_N is None:
        ends_E = ends_E.to(torch.int64)
        expert_N = row_experts(ends_E, torch.arange(num_rows, device=ends_E.device))
    return b_EX.float().index_select(0, expert_N).to(b_EX.dtype)


def expert_mlp_reference(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                         b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                         b_out_ED: torch.Tensor | None, activation: str,
                         parked: bool = True, rows_N: torch.Tensor | None = None
                         ) -> torch.Tensor:
    if rows_N is not None:
        x_ND = x_ND[rows_N]
    ends = [0] + ends_E.tolist()
    out = x_ND.new_zeros(x_ND.shape[0], w_out_EFD.shape[-1])
    for e in range(w_in_EDI.shape[0]):
        lo, hi = ends[e], ends[e + 1]
        if hi == lo:
            continue
        h = x_ND[lo:hi] @ w_in_EDI[e]
        if b_in_EI is not None:
            h = h + b_in_EI[e]
        y = apply_activation(h, activation) @ w_out_EFD[e]
        if b_out_ED is not None:
            y = y + b_out_ED[e]
        out[lo:hi] = y
    return out


@dataclass(frozen=True)
class FusedBias:
    """grouped_mlp's bias handling in one pass each (moeflow.ops.expert_bias_triton): `activate`
    (h_NI, b_EI, ends_E) -> act(h + b[expert of the row]), its rows past ends_E[-1] unspecified
    (the down GEMM never reads them), `add` (y_NX, b_EX, ends_E) -> y + b[expert of the row],
    those rows zero; both give the biases their gradients."""
    activate: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    add: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class _ZeroRowsInGrad(torch.autograd.Function):
    """Identity forward; the backward zeroes the gradient rows of mask_N1."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, mask_N1: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(mask_N1)
        return x_ND.view_as(x_ND)

    @staticmethod
    def backward(ctx, g_ND: torch.Tensor):
        (mask_N1,) = ctx.saved_tensors
        return g_ND.masked_fill(mask_N1, 0), None


def grouped_mlp(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                b_out_ED: torch.Tensor | None, activate, parked: bool,
                rows_N: torch.Tensor | None = None, grouped_mm=torch._grouped_mm,
                fused_bias: FusedBias | None = None) -> torch.Tensor:
    """grouped_mm → activate → grouped_mm. torch._grouped_mm leaves rows past the last offset
    uninitialised in its output and in its input gradient (its weight gradient never reads
    them), so with `parked` rows this zeroes exactly what would carry them out: y's rows (to
    the combine), x's gradient rows (to the tokens), and — only with a first bias, whose
    gradient sums h's rows — h's rows. Each mask reads and writes its whole tensor; h's
    ([N, I], 4× y's for a GELU expert of width 4·D) and its backward were ~0.3 ms of a
    fwd+bwd call of the ds-1.3b+moe128 layer at 4096 tokens (H200 profile, 2026-12-02), so
    bias-free experts skip it.
    `grouped_mm`: torch._grouped_mm or a replacement with its signature and contract
    (moeflow.ops.fp8_grouped.fp8_grouped_mm). `fused_bias`: one-pass replacements for the
    bias gathers, adds and masks (and the first bias's activation)."""
    if rows_N is not None:
        x_ND = x_ND[rows_N]
    # Host work matters here at small N (issue 14): one arange and one searchsorted serve the
    # parked-row mask and both biases, and masked_fill zeroes rows without where's scalar
    # operand (forward values and gradients are where's: the masked rows get exact zeros).
    offs = ends_E.to(torch.int32)
    N = x_ND.shape[0]
    fuse_in = fused_bias is not None and b_in_EI is not None
    fuse_out = fused_bias is not None and b_out_ED is not None
    index_N = None
    if parked or (b_in_EI is not None and not fuse_in) or (b_out_ED is not None and not fuse_out):
        index_N = torch.arange(N, device=x_ND.device)
    parked_N1 = (index_N >= ends_E[-1]).unsqueeze(1) if parked else None
    expert_N = None
    if (b_in_EI is not None and not fuse_in) or (b_out_ED is not None and not fuse_out):
        expert_N = row_experts(ends_E.to(torch.int64), index_N)
    if parked and x_ND.requires_grad:
        x_ND = _ZeroRowsInGrad.apply(x_ND, parked_N1)
    h_NI = grouped_mm(x_ND, w_in_EDI, offs=offs)
    if fuse_in:
        a_NF = fused_bias.activate(h_NI, b_in_EI, ends_E)
    else:
        if b_in_EI is not None:
            h_NI = h_NI + _row_bias(b_in_EI, ends_E, N, expert_N)
            if parked:
                h_NI = h_NI.masked_fill(parked_N1, 0)
        a_NF = activate(h_NI)
    y_ND = grouped_mm(a_NF, w_out_EFD, offs=offs)
    if fuse_out:
        return fused_bias.add(y_ND, b_out_ED, ends_E)  # parked rows zero
    if b_out_ED is not None:
        y_ND = y_ND + _row_bias(b_out_ED, ends_E, N, expert_N)
    if parked:
        y_ND = y_ND.masked_fill(parked_N1, 0)
    return y_ND


def expert_mlp_grouped_mm(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                          b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                          b_out_ED: torch.Tensor | None, activation: str,
                          parked: bool = True, rows_N: torch.Tensor | None = None
                          ) -> torch.Tensor:
    return grouped_mlp(x_ND, ends_E, w_in_EDI, b_in_EI, w_out_EFD, b_out_ED,
                       lambda h: apply_activation(h, activation).contiguous(), parked, rows_N)


def expert_mlp_fp8(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                   b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                   b_out_ED: torch.Tensor | None, activation: str, parked: bool = True,
                   rows_N: torch.Tensor | None = None, *, kernel: bool) -> torch.Tensor:
    """grouped_mlp with FP8 grouped GEMMs; x and the weights in the compute dtype."""
    return grouped_mlp(x_ND, ends_E, w_in_EDI, b_in_EI, w_out_EFD, b_out_ED,
                       lambda h: apply_activation(h, activation).contiguous(), parked, rows_N,
                       functools.partial(fp8_grouped_mm, kernel=kernel))
