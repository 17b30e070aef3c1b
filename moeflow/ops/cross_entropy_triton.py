"""The cross-entropy's elementwise passes over one chunk of LM-head logits, one Triton program
per row, for moeflow.ops.linear_cross_entropy on CUDA.

Why: in plain torch a chunk of C tokens over a vocabulary V costs, besides the head's GEMMs, an
fp32 copy of the bf16 logits and a log-sum-exp over it (forward), then again the copy, the
subtraction, the exponential, the one-hot scatter, the scaling, the cast back to bf16 and a
padded copy (backward). On an H200 these kernels took 711 (the fp32 copy), 616 (sub), 616
(mul) and 387 µs (exp) a call at 4096 x 50257 chunks, about 67 ms of a 640 ms 350m-moe128
training step (benchmarks/results/train_throughput, session 29's profile). Here the
forward reads each bf16 row twice (max, then the sum of exponentials; the second read mostly
from L2) and the backward reads it once and writes the gradient over it, in place.

Same math as the reference: fp32 from the logits (as `.float()`), lse = max + log Σ exp(x −
max), the gradient (exp(x − lse) − onehot) · weight rounded once to the logits' dtype; only the
order of the fp32 sums differs. Columns V ≤ v < row length (the head's alignment padding,
moeflow.ops.linear_cross_entropy.aligned_rows) are not part of the softmax and get a zero
gradient.

Legend: C rows (tokens of a chunk), V vocabulary, P the logits' row length (V padded).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import next_power_of_2

# Columns per step of a row's loop (bf16: 4 KB) and warps per program; the whole row on an
# H200 is ~100 KB at GPT-2's vocabulary.
_BLOCK_V = 2048
_WARPS = 8


@triton.jit
def _lse_picked_kernel(logits_ptr, target_ptr, lse_ptr, picked_ptr, V, stride_c,
                       BLOCK_V: tl.constexpr):
    """Row c: lse[c] = log Σ_v exp(x[c, v]) over v < V, picked[c] = x[c, target[c]] (fp32)."""
    c = tl.program_id(0).to(tl.int64)
    row = logits_ptr + c * stride_c
    v = tl.arange(0, BLOCK_V)
    m_V = tl.full([BLOCK_V], float("-inf"), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(row + v0 + v, mask=v0 + v < V, other=float("-inf")).to(tl.float32)
        m_V = tl.maximum(m_V, x)
    m = tl.max(m_V, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # a row of -inf: lse -inf, as torch's
    s_V = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        x = tl.load(row + v0 + v, mask=v0 + v < V, other=float("-inf")).to(tl.float32)
        s_V += tl.exp(x - m_safe)
    tl.store(lse_ptr + c, m_safe + tl.log(tl.sum(s_V, axis=0)))
    t = tl.load(target_ptr + c)  # a target outside [0, V): NaN, never a read out of the row
    tl.store(picked_ptr + c, tl.load(row + t, mask=(t >= 0) & (t < V),
                                     other=float("nan")).to(tl.float32))


@triton.jit
def _softmax_grad_kernel(logits_ptr, lse_ptr, target_ptr, weight_ptr, V, P, stride_c,
                         BLOCK_V: tl.constexpr):
    """Row c, in place: x[c, v] = (exp(x[c, v] − lse[c]) − [v == target[c]]) · weight[c] for
    v < V, 0 for V ≤ v < P."""
    c = tl.program_id(0).to(tl.int64)
    row = logits_ptr + c * stride_c
    lse = tl.load(lse_ptr + c)
    t = tl.load(target_ptr + c)
    wgt = tl.load(weight_ptr + c)
    v = tl.arange(0, BLOCK_V)
    for v0 in range(0, P, BLOCK_V):
        col = v0 + v
        x = tl.load(row + col, mask=col < V, other=0.0).to(tl.float32)
        g = (tl.exp(x - lse) - tl.where(col == t, 1.0, 0.0)) * wgt
        tl.store(row + col, tl.where(col < V, g, 0.0).to(logits_ptr.dtype.element_ty),
                 mask=col < P)


def _block(length: int) -> int:
    return min(_BLOCK_V, next_power_of_2(max(length, 16)))


def lse_and_picked(logits_CP: torch.Tensor, V: int, target_C: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse_C, picked_C), fp32: the log-sum-exp of each row's first V logits and the logit at
    its target; NaN for a target outside [0, V), so that the loss is NaN (the trainer then stops
    before its optimizer step) where torch's gather would fault."""
    C = logits_CP.shape[0]
    lse_C = torch.empty(C, dtype=torch.float32, device=logits_CP.device)
    picked_C = torch.empty(C, dtype=torch.float32, device=logits_CP.device)
    if C:
        _lse_picked_kernel[(C,)](logits_CP, target_C.contiguous(), lse_C, picked_C, V,
                                 logits_CP.stride(0), BLOCK_V=_block(V), num_warps=_WARPS)
    return lse_C, picked_C


def softmax_grad_(logits_CP: torch.Tensor, V: int, lse_C: torch.Tensor, target_C: torch.Tensor,
                  weight_C: torch.Tensor) -> torch.Tensor:
    """logits_CP overwritten with the cross-entropy's gradient (softmax − one-hot) · weight_C
    over its first V columns, zeros past them; returned. Rows must be contiguous."""
    C, P = logits_CP.shape
    if logits_CP.stride(1) != 1:
        raise ValueError("softmax_grad_: the logits' rows must be contiguous")
    if C:
        _softmax_grad_kernel[(C,)](logits_CP, lse_C.contiguous(), target_C.contiguous(),
                                   weight_C.to(torch.float32).contiguous(), V, P,
                                   logits_CP.stride(0), BLOCK_V=_block(P), num_warps=_WARPS)
    return logits_CP
