"""The LM head and the cross-entropy in one autograd op over chunks of tokens, never holding the
[tokens, vocabulary] logits (`TrainConfig.loss_chunk`).

Why: the plain loss, F.cross_entropy(lm_head(h).float(), target), keeps the logits in the
compute dtype for the head's backward plus their fp32 copy and log-softmax for the loss's: at
finegrained-1b's micro-batch of 4 x 2048 tokens and a 50k vocabulary that is ~4 GB of
activations that exist only for the last layer, and they cap the micro-batch. Here the forward
computes each chunk's logits, keeps only its log-sum-exp (4 bytes a token), and sums the loss;
the backward recomputes each chunk's logits (one more head GEMM per chunk: ~1/3 more head
FLOPs, a few % of a step), forms softmax - one-hot in fp32, and accumulates the input and
weight gradients chunk by chunk. On CUDA the softmax passes over each chunk's logits are
Triton kernels (moeflow.ops.cross_entropy_triton: the bf16 logits read in place, no fp32 copies)
and the weight gradient's GEMM writes fp32 directly; elsewhere they are plain torch.

Same math as the plain loss: the logits from the same GEMM in the same compute dtype (the
autocast dtype when autocast is on, as the head would run), fp32 from there on, mean over the
targets that are not `ignore_index`; only the order of the fp32 sums over chunks differs.

Vocabulary alignment: a vocabulary that is not a multiple of VOCAB_ALIGN (GPT-2's 50257, the
paper presets') gives the logits and their gradient a row stride cuBLAS cannot feed to its
Hopper kernels; on an H200 it then ran all three head GEMMs on sm_75-era CUTLASS kernels (~60
ms of a 255 ms 350m-moe128 step, session 27's profile, benchmarks/results/train_throughput). So
both paths here multiply by the weight with zero rows appended up to the next multiple
(`aligned_rows`) and drop those columns: the padded logits are exactly 0 and unused, their
gradients 0, so the loss and the gradients are the same math.

Legend: N tokens, D model dim, V vocabulary, C tokens per chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeflow.ops.autocast import compute_dtype
from moeflow.ops.backend import records_grad, triton_available

# Rows of the LM-head weight are padded to a multiple of this for its GEMMs (module docstring).
VOCAB_ALIGN = 64


def aligned_rows(w_VD: torch.Tensor) -> torch.Tensor:
    """w_VD with zero rows appended up to a multiple of VOCAB_ALIGN rows (itself if aligned)."""
    pad = -w_VD.shape[0] % VOCAB_ALIGN
    return F.pad(w_VD, (0, 0, 0, pad)) if pad else w_VD


def head_logits(h_ND: torch.Tensor, w_VD: torch.Tensor) -> torch.Tensor:
    """F.linear(h_ND, w_VD): the LM head. In training (autograd recording) through the padded
    weight, the logits a [..., V] view of the [..., V_padded] product, so that the forward and
    both backward GEMMs run aligned; the padding copies the weight, so inference (decode: one
    row against the whole weight) keeps the plain product."""
    V = w_VD.shape[0]
    if V % VOCAB_ALIGN == 0 or not records_grad(h_ND, w_VD):
        return F.linear(h_ND, w_VD)
    return F.linear(h_ND, aligned_rows(w_VD))[..., :V]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, target_N, chunk, ignore_index, dtype, kernels):
        N, V = h_ND.shape[0], w_VD.shape[0]
        w = aligned_rows(w_VD.to(dtype))
        lse_N = torch.zeros(N, dtype=torch.float32, device=h_ND.device)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        valid_N = target_N != ignore_index
        safe_N = torch.where(valid_N, target_N, 0)
        with torch.autocast(h_ND.device.type, enabled=False):
            for s in range(0, N, chunk):
                logits_CP = F.linear(h_ND[s:s + chunk].to(dtype), w)
                if kernels:
                    lse_C, picked_C = _kernels().lse_and_picked(
                        logits_CP, V, safe_N[s:s + chunk])
                else:
                    logits_CV = logits_CP[:, :V].float()
                    lse_C = torch.logsumexp(logits_CV, dim=-1)
                    picked_C = logits_CV.gather(1, safe_N[s:s + chunk, None]).squeeze(1)
                total += torch.where(valid_N[s:s + chunk], lse_C - picked_C, 0.0).sum()
                lse_N[s:s + chunk] = lse_C
        count = valid_N.sum()
        ctx.save_for_backward(h_ND, w_VD, safe_N, valid_N, lse_N, count)
        ctx.chunk, ctx.dtype, ctx.kernels = chunk, dtype, kernels
        return total / count  # 0 targets: nan, as F.cross_entropy's mean

    @staticmethod
    def backward(ctx, grad_loss):
        h_ND, w_VD, safe_N, valid_N, lse_N, count = ctx.saved_tensors
        chunk, dtype, kernels = ctx.chunk, ctx.dtype, ctx.kernels
        V = w_VD.shape[0]
        w = aligned_rows(w_VD.to(dtype))
        pad = w.shape[0] - V
        scale = grad_loss.float() / count
        grad_h = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w_VD.device) \
            if ctx.needs_input_grad[1] else None
        with torch.autocast(h_ND.device.type, enabled=False):
            for s in range(0, h_ND.shape[0], chunk):
                h_CD = h_ND[s:s + chunk].to(dtype)
                logits_CP = F.linear(h_CD, w)
                weight_C = valid_N[s:s + chunk] * scale
                if kernels:  # in place, the padded columns' 0s included
                    g_CP = _kernels().softmax_grad_(
                        logits_CP, V, lse_N[s:s + chunk], safe_N[s:s + chunk], weight_C)
                else:
                    g_CV = torch.exp(logits_CP[:, :V].float() - lse_N[s:s + chunk, None])
                    g_CV.scatter_add_(1, safe_N[s:s + chunk, None],
                                      torch.full_like(lse_N[s:s + chunk, None], -1.0))
                    g_CP = (g_CV * weight_C[:, None]).to(dtype)
                    g_CP = F.pad(g_CP, (0, pad)) if pad else g_CP  # the padded columns' 0s
                if grad_h is not None:
                    grad_h[s:s + chunk] = (g_CP @ w).to(h_ND.dtype)
                if grad_w is not None:
                    grad_w += _mm_fp32(g_CP.t(), h_CD)
        if grad_w is not None:
            grad_w = grad_w[:V].to(w_VD.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _mm_fp32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b in fp32: on CUDA from half operands one GEMM with an fp32 output (no rounding of
    the product to the operands' dtype, no cast pass), else the product cast up."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return (a @ b).float()


def _kernels():
    """moeflow.ops.cross_entropy_triton, imported on first use (Triton is optional)."""
    from moeflow.ops import cross_entropy_triton as module
    return module


def linear_cross_entropy(h_ND: torch.Tensor, weight_VD: torch.Tensor, target_N: torch.Tensor,
                         chunk: int, ignore_index: int = -100, kernels: bool | None = None
                         ) -> torch.Tensor:
    """F.cross_entropy(F.linear(h_ND, weight_VD).float(), target_N) (mean over the targets that
    are not `ignore_index`) without the [N, V] logits: `chunk` tokens at a time. `kernels`: the
    softmax passes in moeflow.ops.cross_entropy_triton (default: on CUDA) or plain torch."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk}: must be a positive number of tokens")
    if kernels is None:
        kernels = h_ND.is_cuda and triton_available()
    return _LinearCrossEntropy.apply(h_ND, weight_VD, target_N, chunk, ignore_index,
                                     compute_dtype(h_ND), kernels)


def next_token_loss(out, head_weight_VD: torch.Tensor, target_BT: torch.Tensor, chunk: int
                    ) -> torch.Tensor:
    """The LM loss of a forward's ModelOutput: fused with the head over `chunk` tokens at a
    time when the forward returned `hidden` (chunk > 0), else the plain fp32 cross-entropy of
    its logits. Training and its benchmark both compute the loss this way."""
    if chunk:
        return linear_cross_entropy(out.hidden.flatten(0, 1), head_weight_VD,
                                    target_BT.flatten(), chunk)
    return F.cross_entropy(out.logits.float().flatten(0, 1), target_BT.flatten())
