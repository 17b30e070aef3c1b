"""Grouped expert MLP: every expert's MLP over its contiguous block of expert-sorted rows.

Rows x_ND are sorted by expert; expert e owns rows [ends_E[e-1], ends_E[e]). Rows past ends_E[-1]
(dropped assignments parked at the end, `parked=True`) are not computed: their outputs are zero and
they receive no gradient. torch._grouped_mm leaves such rows uninitialised in its outputs and in
its input gradients, so the grouped path masks them explicitly; garbage there would otherwise
reach the token gradients and the biases.

Legend: N sorted rows, D model dim, F expert ffn dim, I = F or 2F (SwiGLU's gate|up), E experts.
  w_in_EDI, b_in_EI, w_out_EFD, b_out_ED (biases optional).

`expert_mlp_reference` loops over experts with plain matmuls and runs anywhere;
`expert_mlp_grouped_mm` issues two `torch._grouped_mm` calls (no host sync).
"""

from __future__ import annotations

import torch

from moeflow.ops.activation import apply_activation


def _row_bias(b_EX: torch.Tensor, ends_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """b_EX[expert of each row] for rows sorted by expert: [N, X] (rows past the end get the last).

    Gathered from an fp32 copy, so the backward (a scatter-add of the rows' gradients into the
    bias) accumulates in fp32; scatter-adding a few hundred bf16 rows into bf16 rounds at every
    add (3 % error on the bias gradient, measured on an H200) where the reference's sum over rows
    rounds once. Forward values are unchanged (bf16 → fp32 → bf16 is exact).

    `index_select`, not `b[idx]`: the backward of advanced indexing is CUDA's sort-based
    accumulate kernel, which serialises duplicate indices — here every row of an expert — and
    took 100 of moe-S's 153 ms per training step on an H200; index_select's backward is an
    index_add (atomic adds on CUDA, deterministic on CPU under deterministic mode)."""
    rows = torch.arange(num_rows, device=ends_E.device)
    expert_N = torch.searchsorted(ends_E.to(torch.int64), rows, right=True)
    return b_EX.float().index_select(0, expert_N.clamp_max(b_EX.shape[0] - 1)).to(b_EX.dtype)


def expert_mlp_reference(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                         b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                         b_out_ED: torch.Tensor | None, activation: str,
                         parked: bool = True) -> torch.Tensor:
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


def grouped_mlp(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                b_out_ED: torch.Tensor | None, activate, parked: bool) -> torch.Tensor:
    """grouped_mm → activate → grouped_mm. torch._grouped_mm leaves rows past the last offset
    uninitialised, so with `parked` rows those rows are zeroed at every stage (forward values
    and the gradients flowing back through them)."""
    offs = ends_E.to(torch.int32)
    N = x_ND.shape[0]
    valid_N1 = (torch.arange(N, device=x_ND.device) < ends_E[-1])[:, None] if parked else None
    if parked:
        x_ND = torch.where(valid_N1, x_ND, 0)
    h_NI = torch._grouped_mm(x_ND, w_in_EDI, offs=offs)
    if b_in_EI is not None:
        h_NI = h_NI + _row_bias(b_in_EI, ends_E, N)
    if parked:
        h_NI = torch.where(valid_N1, h_NI, 0)
    y_ND = torch._grouped_mm(activate(h_NI), w_out_EFD, offs=offs)
    if b_out_ED is not None:
        y_ND = y_ND + _row_bias(b_out_ED, ends_E, N)
    if parked:
        y_ND = torch.where(valid_N1, y_ND, 0)
    return y_ND


def expert_mlp_grouped_mm(x_ND: torch.Tensor, ends_E: torch.Tensor, w_in_EDI: torch.Tensor,
                          b_in_EI: torch.Tensor | None, w_out_EFD: torch.Tensor,
                          b_out_ED: torch.Tensor | None, activation: str,
                          parked: bool = True) -> torch.Tensor:
    return grouped_mlp(x_ND, ends_E, w_in_EDI, b_in_EI, w_out_EFD, b_out_ED,
                       lambda h: apply_activation(h, activation).contiguous(), parked)
