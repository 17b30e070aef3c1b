"""FP8 grouped GEMM over expert-sorted rows, forward and backward: the expert GEMMs of
`Backends(matmul="fp8")` (moeflow.ops.expert_mlp.expert_mlp_fp8 runs two of them).

    y_NJ = fp8_grouped_mm(x_NK, w_EKJ, offs=offs_E, kernel=True)

y[n] = x[n] · w[e] for the rows n of expert e, [offs[e-1], offs[e]) (offs: int32 ends, as for
torch._grouped_mm, which this replaces). The recipe is moeflow.ops.fp8_linear's: e4m3,
power-of-two scales along each GEMM's contraction axis, fp32 accumulation (the kernel's, on
Hopper: about 14 bits between promotions, see fp8_linear), output in the inputs' dtype.
Measured on the H200 (2026-12-02): slower than bf16, 9.85 ms against torch._grouped_mm's 1.83
ms for one forward and backward of 49152 rows over 64 experts (2048 -> 1408), the quantization
passes and the grouped kernel itself (0.91 ms a call in a finegrained-1b step) both. Since then
the kernel path quantizes the row-scaled operands (forward and dX) with the fused Triton
kernels (fp8_linear.quantize_operand; GPU speed not measured yet); the dW's per-(expert,
column) scales are still plain torch (quantize_segment_columns).
The three GEMMs and their scales:
  forward  y     = x · w[e]       contracts K:  x per row, w[e] per (expert, output column j)
  dX       dx    = dy · w[e]ᵀ     contracts J:  dy per row, w[e] per (expert, input row k)
  dW       dw[e] = x_eᵀ · dy_e    contracts expert e's rows: x per (expert, column k) and dy per
                                  (expert, column j), each amax taken over that expert's rows
                                  only — a scale shared with another expert's rows would not
                                  factor out of expert e's sum.

Rows past offs[-1] (dropped assignments parked at the end, see moeflow.ops.expert_mlp): the
contract of torch._grouped_mm — their output and input-gradient rows are unspecified (the kernel
leaves them unwritten; grouped_mlp zeroes them) — and they never reach dW: they form their own
segment in the column scales and lie outside every group of the dW GEMM. An expert without rows
gets a zero weight gradient.

`kernel=True`: torch._scaled_grouped_mm (sm90/sm100, e4m3 operands, bf16 output, fp32 rowwise
inverse scales; moeflow.ops.backend.scaled_grouped_mm_supported says where it runs). Forward and
dX are its 2D×3D form: scale_a [N] per row, scale_b [E, J] (or [E, K]) per expert and column,
the 3D operand column-major. dW is its 2D×2D form, groups along the contraction: scale_a [E·K]
and scale_b [E·J] expert-major, output [E, K, J]; the kernel asserts that every group's row count
is a multiple of 16 (each group's start must be 16-byte aligned for TMA), and sm100's version
also refuses empty groups, so the dW operands are gathered into segments of a multiple of 16
rows, at least 16, zero rows filling them (zeros add nothing to a sum and change no amax; an
idle expert's gradient comes out exactly zero). `kernel=False`, the reference: the same
quantized operands, dequantized, in one fp32 matmul per expert (one host sync for the offsets);
it runs anywhere and defines the numerics.

Legend: N rows, K and J the two widths of w (D/I for the up projection, F/D for the down), E
experts, P rows after 16-alignment.
"""

from __future__ import annotations

import torch

from moeflow.ops.fp8_linear import FP8, dequantize, pow2_scales, quantize_operand
from moeflow.ops.grid import cdiv

# torch._scaled_grouped_mm's 2D×2D form needs group sizes that are multiples of this (see above).
GROUP_ALIGN = 16


def _segments(offs_E: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Each row's expert, E for rows past offs[-1] (their own segment)."""
    rows = torch.arange(num_rows, device=offs_E.device, dtype=offs_E.dtype)
    return torch.searchsorted(offs_E, rows, right=True)


def quantize_segment_columns(t_NC: torch.Tensor, segment_N: torch.Tensor,
                             bounds_S1: torch.Tensor, block: int = 1
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_NC, inverse_EC): e4m3 with one scale per (expert, column), the amax over the expert's
    rows. bounds_S1 = [0, offs..., N]: the last segment holds the rows past the end, whose own
    scales are not returned. A segmented reduction, not a scatter: every expert's rows are
    contiguous, and a scatter-amax would serialise hundreds of rows on each (expert, column).
    `block`: every bound is a multiple of it (the 16-aligned dW operands), so blocks of rows are
    reduced densely first and the segmented pass runs over block maxima."""
    amax_NC = t_NC.abs()
    if block > 1:
        amax_NC = amax_NC.view(-1, block, t_NC.shape[1]).amax(1)
        bounds_S1 = bounds_S1 // block
    amax_SC = torch.segment_reduce(amax_NC, "max", offsets=bounds_S1, unsafe=True, initial=0)
    scale, inverse = pow2_scales(amax_SC)
    return (t_NC * scale.to(t_NC.dtype)[segment_N]).to(FP8), inverse[:-1]


def _grouped_nt(a_NC: torch.Tensor, b_EDC: torch.Tensor, offs_E: torch.Tensor, kernel: bool
                ) -> torch.Tensor:
    """out[n] = a[n] · b[e]ᵀ for the rows of expert e: [N, D], a per row and b per (expert, row)
    quantized along C."""
    E, D, C = b_EDC.shape
    qa, inv_a = quantize_operand(a_NC, kernel)
    qb, inv_b = quantize_operand(b_EDC.reshape(E * D, C), kernel)
    qb, inv_b = qb.view(E, D, C), inv_b.view(E, D)
    if kernel:
        return torch._scaled_grouped_mm(qa, qb.transpose(1, 2), inv_a.reshape(-1), inv_b,
                                        offs=offs_E, out_dtype=a_NC.dtype, use_fast_accum=False)
    out = a_NC.new_zeros(a_NC.shape[0], D)
    lo = 0
    for e, hi in enumerate(offs_E.tolist()):
        if hi > lo:
            out[lo:hi] = (dequantize(qa[lo:hi], inv_a[lo:hi])
                          @ dequantize(qb[e], inv_b[e, :, None]).t()).to(out.dtype)
        lo = hi
    return out


def _aligned_rows(x_NK: torch.Tensor, dy_NJ: torch.Tensor, offs_E: torch.Tensor):
    """x and dy with every expert's rows moved to a segment of a multiple of GROUP_ALIGN rows
    (at least one: an idle expert gets a group of zero rows, since sm100's kernel refuses empty
    groups of this form), zero rows filling each segment, rows past the end dropped:
    (x_PK, dy_PJ, offs_E of the aligned segments, segment_P). A gather, so deterministic and
    without host sync: P is a bound, N rounded up plus GROUP_ALIGN·E."""
    N, E = x_NK.shape[0], offs_E.shape[0]
    counts_E = torch.diff(offs_E, prepend=offs_E.new_zeros(1))
    padded_E = (counts_E.clamp_min(1) + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
    padded_offs_E = torch.cumsum(padded_E, 0).to(offs_E.dtype)
    P = cdiv(N, GROUP_ALIGN) * GROUP_ALIGN + GROUP_ALIGN * E
    segment_P = _segments(padded_offs_E, P)
    none = offs_E.new_zeros(1)  # segment E (past the aligned end) holds no rows
    start_S = torch.cat([offs_E - counts_E, none])
    aligned_start_S = torch.cat([padded_offs_E - padded_E, padded_offs_E[-1:]])
    count_S = torch.cat([counts_E, none])
    position_P = torch.arange(P, device=x_NK.device) - aligned_start_S[segment_P]
    empty_P1 = (position_P >= count_S[segment_P])[:, None]
    source_P = (start_S[segment_P] + position_P).clamp_(0, N - 1)
    x_PK = x_NK.index_select(0, source_P).masked_fill_(empty_P1, 0)
    dy_PJ = dy_NJ.index_select(0, source_P).masked_fill_(empty_P1, 0)
    return x_PK, dy_PJ, padded_offs_E, segment_P


def _weight_grad(x_NK: torch.Tensor, dy_NJ: torch.Tensor, offs_E: torch.Tensor, kernel: bool
                 ) -> torch.Tensor:
    """dw[e] = x_eᵀ · dy_e over expert e's rows: [E, K, J]."""
    E = offs_E.shape[0]
    if kernel:
        x_NK, dy_NJ, offs_E, segment_N = _aligned_rows(x_NK, dy_NJ, offs_E)
    else:
        segment_N = _segments(offs_E, x_NK.shape[0])
    block = GROUP_ALIGN if kernel else 1
    rows = offs_E.new_full((1,), x_NK.shape[0])  # a fill, not a host-to-device copy
    bounds_S1 = torch.cat([offs_E.new_zeros(1), offs_E, rows])
    qx, inv_x = quantize_segment_columns(x_NK, segment_N, bounds_S1, block)
    qdy, inv_dy = quantize_segment_columns(dy_NJ, segment_N, bounds_S1, block)
    if kernel:
        return torch._scaled_grouped_mm(qx.t().contiguous(), qdy.t().contiguous().t(),
                                        inv_x.reshape(-1), inv_dy.reshape(-1), offs=offs_E,
                                        out_dtype=x_NK.dtype, use_fast_accum=False)
    dw = x_NK.new_zeros(E, x_NK.shape[1], dy_NJ.shape[1])
    lo = 0
    for e, hi in enumerate(offs_E.tolist()):
        if hi > lo:
            dw[e] = (dequantize(qx[lo:hi], inv_x[e]).t()
                     @ dequantize(qdy[lo:hi], inv_dy[e])).to(dw.dtype)
        lo = hi
    return dw


class _FP8GroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NK, w_EKJ, offs_E, kernel):
        ctx.save_for_backward(x_NK, w_EKJ, offs_E)
        ctx.kernel = kernel
        with torch.autocast(x_NK.device.type, enabled=False):
            return _grouped_nt(x_NK, w_EKJ.transpose(1, 2), offs_E, kernel)

    @staticmethod
    def backward(ctx, dy_NJ):
        x_NK, w_EKJ, offs_E = ctx.saved_tensors
        dx = dw = None
        with torch.autocast(dy_NJ.device.type, enabled=False):
            dy_NJ = dy_NJ.to(x_NK.dtype).contiguous()
            if ctx.needs_input_grad[0]:
                dx = _grouped_nt(dy_NJ, w_EKJ, offs_E, ctx.kernel)
            if ctx.needs_input_grad[1]:
                dw = _weight_grad(x_NK, dy_NJ, offs_E, ctx.kernel)
        return dx, dw, None, None


def fp8_grouped_mm(x_NK: torch.Tensor, w_EKJ: torch.Tensor, *, offs: torch.Tensor,
                   kernel: bool) -> torch.Tensor:
    """torch._grouped_mm(x, w, offs=offs) in FP8 (see the module docstring); x and w in one
    dtype, which the output has."""
    if x_NK.dtype != w_EKJ.dtype:
        raise ValueError(f"fp8_grouped_mm: x is {x_NK.dtype} but w is {w_EKJ.dtype}; "
                         "give both in the compute dtype")
    return _FP8GroupedMM.apply(x_NK, w_EKJ, offs, kernel)
