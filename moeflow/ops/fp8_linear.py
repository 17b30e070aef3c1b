"""FP8 matmuls with rowwise scaling, forward and backward: `Backends(matmul="fp8")`'s linears.

    y = fp8_linear(x, weight, kernel=True)   # x [..., K], weight [N, K]: x · weightᵀ

The recipe ("rowwise", as torchao's float8 training and, at a finer grain, DeepSeek-V3):
every GEMM operand is cast to float8_e4m3fn with one power-of-two scale per row of the operand
laid out contraction-last, the GEMM accumulates the fp8 products in fp32, and its epilogue
multiplies by the two inverse scales and casts to the compute dtype.

Which axis each scale runs along. A GEMM C = A·Bᵀ (A [M, K], B [N, K]) sums over k:
C[m, n] = Σ_k A[m, k]·B[n, k]. A scale factors out of that sum only if it is constant along k,
so A gets one scale per row m and B one per row n: C[m, n] = Σ_k qA[m, k]·qB[n, k] / (sA[m]·sB[n]).
A linear layer runs three GEMMs, each contracting a different axis:
  forward  Y  = X · Wᵀ   contracts K (in features):  X per token, W per output feature (row)
  dX       dX = dY · W   contracts N (out features): dY per token, W per input feature (column)
  dW       dW = dYᵀ · X  contracts M (tokens):       dY per output feature (column), X per input
                                                     feature (column)
So the backward cannot reuse the forward's fp8 copies: X and W are quantized again, along their
other axis, from the high-precision tensors saved for the backward (the memory a bf16 linear keeps).
Every GEMM here is therefore `_gemm_nt(a, b)` = a·bᵀ with both operands scaled along their rows.

Why e4m3 for the gradients too. Per-tensor recipes put gradients in e5m2 (range 2^-16..57344,
2 mantissa bits) because one scale must cover a whole tensor whose rows differ by orders of
magnitude. With a scale per row each scale covers one row's values, where range matters less
than precision, and e4m3's third mantissa bit halves the rounding error (relative 2^-4 instead
of 2^-3). torchao's rowwise recipe and DeepSeek-V3 make the same choice, and
torch._scaled_grouped_mm (the expert GEMMs, moeflow.ops.fp8_grouped) accepts only e4m3.

Scales are powers of two, the largest 2^k with amax·2^k <= 448 (e4m3's largest value), computed
exactly from frexp: multiplying by them is exact, so a value is rounded once (to e4m3) and
dequantized exactly; a row of zeros gets a finite scale. A value v of a row then comes back with
|error| <= 2^-4·|v| (3 mantissa bits, round to nearest), or <= 2^-10 / scale where v·scale falls
in e4m3's subnormal range (below 2^-6).
A power-of-two scale does not change how a normal value rounds, only where the row sits in
e4m3's range: the scale keeps the row's largest values below 448 and as few of its small values
as possible in the subnormals (or at zero), which is why the axis it is shared along matters.

Numerics, and the two implementations. The result is the fp32 sum of the products of the
dequantized operands, cast to the compute dtype (the autocast dtype when autocast is on, as the
layer would run; else the input's). `kernel=False` computes exactly that with an fp32 matmul on
the dequantized operands: it runs anywhere (the CPU, the CI, the loss study) and defines the
numerics. `kernel=True` runs torch._scaled_mm: rowwise fp32 scales scale_a [M, 1] and
scale_b [1, N] (the inverse scales: the kernel multiplies by them), the first operand row-major,
the second column-major, use_fast_accum=False. A product of two e4m3 values is exact in fp32,
but Hopper's FP8 tensor cores keep only about 14 bits of the running sum between promotions to
fp32 (DeepSeek-V3 measured it on the H800): on the H200 (torch 2.11) the kernel was off from the
reference by up to 2.7e-4 of the sum of |products| (tests/test_fp8.py, HOPPER_FP8_ACC), which
matters only where a sum cancels. On CUDA the kernel needs sm89+, bf16 and dimensions that are
multiples of 16 (moeflow.ops.backend.scaled_mm_supported); torch 2.13's CPU build runs it too
(the parity test).

The quantization (amax, scale, multiply, cast). `quantize_rows` is plain torch, a few
elementwise passes per operand; the reference (kernel=False) uses it everywhere. The kernel path
on CUDA quantizes with moeflow.ops.fp8_quantize_triton instead (quantize_operand): at most two
Triton launches that read the operand twice and write the e4m3 values once, coalesced for a
row-contiguous operand and for the backward's transposed views alike, bit-equal to
quantize_rows on finite rows. Measured on the H200 (2026-12-02, benchmarks/results/fp8/), with
plain torch still on the kernel path: the quantization cost more than FP8 saves. An 8192x2048
bf16 operand quantized in 0.38 ms (0.51 ms transposed), where its GEMM with a 6144x2048 weight
takes 0.33 ms in bf16 and 0.23 ms in FP8; a linear's forward and backward (6 quantized
operands, 3 GEMMs) took 3.56 ms against bf16's 0.92 ms. The fused kernels' GPU speed is not
measured yet; the prediction is ~0.02-0.03 ms for that operand in either layout (48 MB of
traffic at ~3 TB/s, plus the second read where it misses L2).

Legend: M rows (tokens), K contraction, N output features; R, C rows and columns of an operand.
"""

from __future__ import annotations

import torch

from moeflow.ops.autocast import compute_dtype

FP8 = torch.float8_e4m3fn  # largest value 448 = 0.875 · 2^9
# Scales stay within 2^±126 so that the inverse scale is a normal fp32 (rows of near-zero values
# then quantize to small e4m3 values or zero instead of overflowing the scale).
MAX_SCALE_EXPONENT = 126


def pow2_scales(amax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inverse scale), fp32 powers of two: the largest 2^k with amax·2^k <= 448.

    amax = m·2^e with m in [0.5, 1) (frexp); 448 = 0.875·2^9, so k = 9 - e when m <= 0.875 and
    8 - e otherwise. Built from the exponent bits, so both are exact."""
    mantissa, exponent = torch.frexp(amax.float())
    k = (9 - exponent - (mantissa > 0.875).to(torch.int32)).clamp_(max=MAX_SCALE_EXPONENT)
    scale = ((k + 127) << 23).view(torch.float32)
    inverse = ((127 - k) << 23).view(torch.float32)
    return scale, inverse


def quantize_rows(t_RC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_RC, inverse_R1): t_RC ≈ q_RC · inverse_R1, e4m3 with one scale per row, q contiguous.

    The scale is applied in t's dtype: a power of two times a bf16 value is exact in bf16 (the
    same exponent range as fp32) down to bf16's subnormals, far below what e4m3 keeps, so the
    result is the fp32 product's at half the memory traffic."""
    amax_R1 = torch.linalg.vector_norm(t_RC, ord=float("inf"), dim=1, keepdim=True)
    scale_R1, inverse_R1 = pow2_scales(amax_R1)
    return (t_RC * scale_R1.to(t_RC.dtype)).to(FP8).contiguous(), inverse_R1


def fused_quantize_fits(t_RC: torch.Tensor) -> bool:
    """Whether moeflow.ops.fp8_quantize_triton quantizes t_RC: a non-empty bf16 or fp32 matrix
    on CUDA whose rows or columns are contiguous (the operands' layouts: a saved activation, a
    weight, or a transposed view of one), with Triton installed."""
    from moeflow.ops.backend import triton_available  # here: backend imports this module's users

    return (t_RC.is_cuda and t_RC.dim() == 2 and t_RC.numel() > 0
            and t_RC.dtype in (torch.bfloat16, torch.float32)
            and 1 in (t_RC.stride(0), t_RC.stride(1)) and triton_available())


def quantize_operand(t_RC: torch.Tensor, kernel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_rows(t_RC) for a GEMM: by the fused Triton kernels on the kernel path where
    they apply (fused_quantize_fits), else in plain torch. The two are bit-equal on finite
    rows (moeflow.ops.fp8_quantize_triton says what differs on rows holding inf or NaN), so the
    reference (kernel=False) keeps plain torch and defines the numerics. Inside a torch.compile
    region (`--compile`'s dense blocks) plain torch too: inductor fuses those passes itself, and
    the fused kernels' wrapper has never been traced by dynamo."""
    if kernel and not torch.compiler.is_compiling() and fused_quantize_fits(t_RC):
        from moeflow.ops.fp8_quantize_triton import quantize_rows_triton

        return quantize_rows_triton(t_RC)
    return quantize_rows(t_RC)


def dequantize(q: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """fp32 values of an fp8 operand (exact: the inverse scale is a power of two)."""
    return q.float() * inverse


def scaled_matmul(a_MK: torch.Tensor, inv_a_M1: torch.Tensor, b_NK: torch.Tensor,
                  inv_b_N1: torch.Tensor, dtype: torch.dtype, kernel: bool) -> torch.Tensor:
    """(a · inv_a) · (b · inv_b)ᵀ in fp32, cast to `dtype`: torch._scaled_mm or its reference."""
    if kernel:
        return torch._scaled_mm(a_MK, b_NK.t(), scale_a=inv_a_M1, scale_b=inv_b_N1.reshape(1, -1),
                                out_dtype=dtype, use_fast_accum=False)
    return (dequantize(a_MK, inv_a_M1) @ dequantize(b_NK, inv_b_N1).t()).to(dtype)


def _gemm_nt(a_MK: torch.Tensor, b_NK: torch.Tensor, kernel: bool) -> torch.Tensor:
    """a · bᵀ with both operands quantized along K (their rows), in a's dtype."""
    qa, inv_a = quantize_operand(a_MK, kernel)
    qb, inv_b = quantize_operand(b_NK, kernel)
    return scaled_matmul(qa, inv_a, qb, inv_b, a_MK.dtype, kernel)


class _FP8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_MK, w_NK, kernel):
        ctx.save_for_backward(x_MK, w_NK)
        ctx.kernel = kernel
        with torch.autocast(x_MK.device.type, enabled=False):
            return _gemm_nt(x_MK, w_NK, kernel)

    @staticmethod
    def backward(ctx, dy_MN):
        x_MK, w_NK = ctx.saved_tensors
        dx = dw = None
        with torch.autocast(dy_MN.device.type, enabled=False):
            dy_MN = dy_MN.to(x_MK.dtype)
            if ctx.needs_input_grad[0]:
                dx = _gemm_nt(dy_MN, w_NK.t(), ctx.kernel)  # contracts N
            if ctx.needs_input_grad[1]:
                dw = _gemm_nt(dy_MN.t(), x_MK.t(), ctx.kernel)  # contracts M
        return dx, dw, None


def fp8_linear(x: torch.Tensor, weight_NK: torch.Tensor, kernel: bool) -> torch.Tensor:
    """x · weightᵀ (no bias) in FP8, forward and backward, in the compute dtype (compute_dtype:
    both operands are cast to it first, as autocast would). x [..., K] -> [..., N]."""
    dtype = compute_dtype(x)
    x_MK = x.to(dtype).reshape(-1, x.shape[-1])
    y_MN = _FP8Linear.apply(x_MK, weight_NK.to(dtype), kernel)
    return y_MN.view(*x.shape[:-1], weight_NK.shape[0])
