"""The experts' biases in the grouped training path (moeflow.ops.expert_mlp.grouped_mlp under
"grouped_mm_fused"), each as one Triton pass with a deterministic backward:

    activate_with_bias(h_NI, b_EI, ends_E, activation) = act(h + b[expert of the row])
    add_bias(y_NX, b_EX, ends_E)                       = y + b[expert of the row]

add_bias zeroes the rows past ends_E[-1] (parked, dropped assignments); activate_with_bias
leaves them, and their input gradient, unwritten, as torch._grouped_mm does with its own (the
down GEMM after it and the up GEMM's backward never read them).

Why: the plain composition gathers an [N, I] copy of the bias rows in fp32 (so that its
backward, an index_add, accumulates in fp32), casts it, adds it, masks the parked rows of the
sum, then runs the activation: five passes over an [N, I] tensor forward, and a backward whose
index_add of N fp32 rows into E bias rows runs on atomics. On an H200 the index_add took 31 ms
and the masks 21.5 ms of a 640 ms 350m-moe128 training step, the gathers and casts besides
(GELU experts 4096 wide with biases, capacity drops; session 29's profile,
benchmarks/results/train_throughput). Here the programs of a column block each walk
a part of one expert's rows (_SPLITS parts an expert): the forward reads h once and writes
act(h + b) once; the backward reads h and the output gradient once, writes the input gradient
once and sums its part of the bias gradient in registers, row by row; the parts are then added
in order (no atomics: the same bits every run). A first version that also zeroed the parked
rows, one program per column block walking all of them, took 2.4 / 4.5 ms per forward /
backward call there (with capacity drops at random initialisation most rows were parked).

Same math as the composition: the sum h + b rounded to h's dtype (as the plain add), the
activation in fp32 from that rounded sum (moeflow.ops.expert_activation_triton's kernels), and
the bias gradient the fp32 sum of the expert's rows of the gradient as rounded to their dtype,
cast to the bias's dtype. Only the order of that fp32 sum differs.

Legend: N expert-sorted rows, E experts, F width (I = 2F for SwiGLU's gate|up, else F), X the
width of y (the model dim).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import cdiv, next_power_of_2
from moeflow.ops.expert_activation_triton import activate, activation_grads

_BLOCK_R = 16  # rows per step of a program's walk over its rows
_BLOCK_F = 256  # columns per program
# Each expert's rows are split among this many programs (their bias-gradient partial sums are
# added in order afterwards), so that an expert far above the average does not run alone.
_SPLITS = 4
# Programs per column block that zero add_bias's parked rows (rows past ends_E[-1]: with
# capacity drops they can be a large share of the rows), each taking every _PARKED-th row block.
_PARKED = 64


@triton.jit
def _rows(ends_ptr, e, s, SPLITS: tl.constexpr):
    """Part s of SPLITS of expert e's rows: [lo, hi)."""
    start = tl.load(ends_ptr + e - 1, mask=e > 0, other=0)
    end = tl.load(ends_ptr + e)
    part = tl.cdiv(end - start, SPLITS)
    lo = start + s * part
    return lo, tl.minimum(lo + part, end)


@triton.jit
def _biased(h_ptr, b_ptr, rows, rm, f, fm, stride, e):
    """h[rows, f] + b[e, f], rounded to h's dtype, in fp32."""
    m = rm[:, None] & fm[None, :]
    h = tl.load(h_ptr + rows[:, None] * stride + f[None, :], mask=m, other=0.0)
    b = tl.load(b_ptr + e * stride + f, mask=fm, other=0.0)
    return (h.to(tl.float32) + b.to(tl.float32)[None, :]).to(h_ptr.dtype.element_ty).to(
        tl.float32)


@triton.jit
def _act_bias_fwd_kernel(h_ptr, b_ptr, ends_ptr, a_ptr, F, SWIGLU: tl.constexpr,
                         SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    e = tl.program_id(1)
    lo, hi = _rows(ends_ptr, e, tl.program_id(2), SPLITS)
    I = 2 * F if SWIGLU else F
    for r0 in range(lo, hi, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        rm = rows < hi
        g = _biased(h_ptr, b_ptr, rows, rm, f, fm, I, e)
        u = g
        if SWIGLU:
            u = _biased(h_ptr + F, b_ptr + F, rows, rm, f, fm, I, e)
        tl.store(a_ptr + rows[:, None] * F + f[None, :],
                 activate(g, u, SWIGLU).to(a_ptr.dtype.element_ty),
                 mask=rm[:, None] & fm[None, :])


@triton.jit
def _act_bias_bwd_kernel(h_ptr, b_ptr, ends_ptr, ga_ptr, gh_ptr, gb_ptr, F, E,
                         SWIGLU: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
                         BLOCK_F: tl.constexpr):
    """The input gradient of the expert's rows, and into gb[s, e] the part's bias gradient."""
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    e = tl.program_id(1)
    s = tl.program_id(2)
    lo, hi = _rows(ends_ptr, e, s, SPLITS)
    I = 2 * F if SWIGLU else F
    sum_g = tl.zeros([BLOCK_F], tl.float32)
    sum_u = tl.zeros([BLOCK_F], tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        rm = rows < hi
        m = rm[:, None] & fm[None, :]
        ga = tl.load(ga_ptr + rows[:, None] * F + f[None, :], mask=m, other=0.0).to(tl.float32)
        x = _biased(h_ptr, b_ptr, rows, rm, f, fm, I, e)
        u = x
        if SWIGLU:
            u = _biased(h_ptr + F, b_ptr + F, rows, rm, f, fm, I, e)
        d_x, d_u = activation_grads(x, u, ga, SWIGLU)
        d_x = d_x.to(gh_ptr.dtype.element_ty)
        if SWIGLU:
            d_u = d_u.to(gh_ptr.dtype.element_ty)
            tl.store(gh_ptr + rows[:, None] * I + F + f[None, :], d_u, mask=m)
            sum_u += tl.sum(tl.where(m, d_u.to(tl.float32), 0.0), axis=0)
        tl.store(gh_ptr + rows[:, None] * I + f[None, :], d_x, mask=m)
        sum_g += tl.sum(tl.where(m, d_x.to(tl.float32), 0.0), axis=0)
    part = gb_ptr + (s * E + e) * I
    tl.store(part + f, sum_g, mask=fm)
    if SWIGLU:
        tl.store(part + F + f, sum_u, mask=fm)


@triton.jit
def _add_bias_fwd_kernel(y_ptr, b_ptr, ends_ptr, out_ptr, N, X, E, SPLITS: tl.constexpr,
                         PARKED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """Programs [0, E·SPLITS) of a column block add the bias to a part of an expert's rows; the
    PARKED after them zero the rows past the last expert's end, every PARKED-th row block."""
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < X
    q = tl.program_id(1)
    if q < E * SPLITS:
        e = q // SPLITS
        lo, hi = _rows(ends_ptr, e, q % SPLITS, SPLITS)
        for r0 in range(lo, hi, BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            rm = rows < hi
            s = _biased(y_ptr, b_ptr, rows, rm, f, fm, X, e)
            tl.store(out_ptr + rows[:, None] * X + f[None, :], s.to(out_ptr.dtype.element_ty),
                     mask=rm[:, None] & fm[None, :])
    else:
        start = tl.load(ends_ptr + E - 1) + (q - E * SPLITS) * BLOCK_R
        zeros = tl.zeros([BLOCK_R, BLOCK_F], out_ptr.dtype.element_ty)
        for r0 in range(start, N, PARKED * BLOCK_R):
            rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
            tl.store(out_ptr + rows[:, None] * X + f[None, :], zeros,
                     mask=(rows < N)[:, None] & fm[None, :])


@triton.jit
def _bias_grad_kernel(g_ptr, ends_ptr, gb_ptr, X, E, SPLITS: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr):
    """gb[s, e] = Σ over part s of expert e's rows of g (fp32, rows in order)."""
    f = tl.program_id(0) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < X
    e = tl.program_id(1)
    s = tl.program_id(2)
    lo, hi = _rows(ends_ptr, e, s, SPLITS)
    acc = tl.zeros([BLOCK_F], tl.float32)
    for r0 in range(lo, hi, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        g = tl.load(g_ptr + rows[:, None] * X + f[None, :],
                    mask=(rows < hi)[:, None] & fm[None, :], other=0.0)
        acc += tl.sum(g.to(tl.float32), axis=0)
    tl.store(gb_ptr + (s * E + e) * X + f, acc, mask=fm)


def _columns(width: int) -> tuple[int, int]:
    """(column blocks, block) for rows `width` wide."""
    block = min(_BLOCK_F, next_power_of_2(width))
    return cdiv(width, block), block


class _ActivateWithBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_NI, b_EI, ends_E, swiglu):
        N, I = h_NI.shape
        E = b_EI.shape[0]
        F = I // 2 if swiglu else I
        a_NF = torch.empty(N, F, dtype=h_NI.dtype, device=h_NI.device)
        cols, block = _columns(F)
        if N > 0:
            _act_bias_fwd_kernel[(cols, E, _SPLITS)](h_NI, b_EI, ends_E, a_NF, F, SWIGLU=swiglu,
                                                     SPLITS=_SPLITS, BLOCK_R=_BLOCK_R,
                                                     BLOCK_F=block)
        ctx.save_for_backward(h_NI, b_EI, ends_E)
        ctx.swiglu = swiglu
        return a_NF

    @staticmethod
    def backward(ctx, g_a_NF):
        h_NI, b_EI, ends_E = ctx.saved_tensors
        N, I = h_NI.shape
        E = b_EI.shape[0]
        F = g_a_NF.shape[1]
        g_h = torch.empty_like(h_NI)
        parts = torch.zeros(_SPLITS, E, I, dtype=torch.float32, device=h_NI.device)
        cols, block = _columns(F)
        if N > 0:
            _act_bias_bwd_kernel[(cols, E, _SPLITS)](
                h_NI, b_EI, ends_E, g_a_NF.contiguous(), g_h, parts, F, E, SWIGLU=ctx.swiglu,
                SPLITS=_SPLITS, BLOCK_R=_BLOCK_R, BLOCK_F=block)
        return g_h, parts.sum(0).to(b_EI.dtype), None, None


class _AddBias(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_NX, b_EX, ends_E):
        N, X = y_NX.shape
        E = b_EX.shape[0]
        out = torch.empty_like(y_NX)
        cols, block = _columns(X)
        if N > 0:
            _add_bias_fwd_kernel[(cols, E * _SPLITS + _PARKED)](
                y_NX, b_EX, ends_E, out, N, X, E, SPLITS=_SPLITS, PARKED=_PARKED,
                BLOCK_R=_BLOCK_R, BLOCK_F=block)
        ctx.save_for_backward(ends_E)
        ctx.bias_dtype = b_EX.dtype
        return out

    @staticmethod
    def backward(ctx, g_NX):
        (ends_E,) = ctx.saved_tensors
        N, X = g_NX.shape
        E = ends_E.shape[0]
        g_NX = g_NX.contiguous()
        parts = torch.zeros(_SPLITS, E, X, dtype=torch.float32, device=g_NX.device)
        cols, block = _columns(X)
        if N > 0:
            _bias_grad_kernel[(cols, E, _SPLITS)](g_NX, ends_E, parts, X, E, SPLITS=_SPLITS,
                                                  BLOCK_R=_BLOCK_R, BLOCK_F=block)
        # Parked rows' gradient passes through: torch._grouped_mm's backward never reads rows
        # past the last group (moeflow.ops.expert_mlp.grouped_mlp), and no bias sums them.
        return g_NX, parts.sum(0).to(ctx.bias_dtype), None


def activate_with_bias(h_NI: torch.Tensor, b_EI: torch.Tensor, ends_E: torch.Tensor,
                       activation: str) -> torch.Tensor:
    """act(h + b[expert of the row]) [N, F]. Rows past ends_E[-1] are left unwritten, and so
    are their input-gradient rows: the contract of torch._grouped_mm, which never reads them
    (moeflow.ops.expert_mlp.grouped_mlp)."""
    return _ActivateWithBias.apply(h_NI.contiguous(), b_EI.contiguous(), ends_E.contiguous(),
                                   activation == "swiglu")


def add_bias(y_NX: torch.Tensor, b_EX: torch.Tensor, ends_E: torch.Tensor) -> torch.Tensor:
    """y + b[expert of the row]; rows past ends_E[-1] zero."""
    return _AddBias.apply(y_NX.contiguous(), b_EX.contiguous(), ends_E.contiguous())
