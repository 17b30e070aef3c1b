"""The experts' activation on CUDA: SwiGLU silu(g) · u or GELU(g), in fp32.

Two forms. `activate` and `activation_grads` are Triton helpers: every expert kernel
(moeflow.ops.grouped_mlp_triton's stream kernels, moeflow.ops.tiled_mlp_triton,
moeflow.ops.persistent_mlp_triton) applies `activate` to its fp32 accumulators before it stores
h, so the [N, 2F] pre-activation never touches memory, and the bias passes
(moeflow.ops.expert_bias_triton) use both. `fused_activation` is the op with its own backward,
which the many-token path (torch._grouped_mm, training included) runs between its two GEMMs:
one pass h → act forward and one backward recomputing from h (h is saved, act is not),
instead of torch's chunk / silu / mul and their backward temporaries.

Legend: N rows, F expert ffn dim, I = F (GELU) or 2F (SwiGLU).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from moeflow.ops.grid import cdiv, next_power_of_2


@triton.jit
def _gelu(x):
    return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))


@triton.jit
def activate(g, u, SWIGLU: tl.constexpr):
    """The experts' activation in fp32: SwiGLU silu(g) · u, or GELU(g) (u unused)."""
    if SWIGLU:
        return g * tl.sigmoid(g) * u
    return _gelu(g)


@triton.jit
def activation_grads(g, u, ga, SWIGLU: tl.constexpr):
    """(d_g, d_u) of activate(g, u) for its output gradient ga, in fp32 (d_u 0 for GELU)."""
    if SWIGLU:
        sg = tl.sigmoid(g)
        silu = g * sg
        return ga * u * (sg + silu * (1.0 - sg)), ga * silu
    cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
    return ga * (cdf + g * pdf), tl.zeros_like(g)



@triton.jit
def _act_fwd_kernel(h_ptr, a_ptr, N, F, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = f < F
    row = pid_n.to(tl.int64)
    I = 2 * F if SWIGLU else F
    g = tl.load(h_ptr + row * I + f, mask=m, other=0.0).to(tl.float32)
    u = g
    if SWIGLU:
        u = tl.load(h_ptr + row * I + F + f, mask=m, other=0.0).to(tl.float32)
    tl.store(a_ptr + row * F + f, activate(g, u, SWIGLU).to(a_ptr.dtype.element_ty), mask=m)


@triton.jit
def _act_bwd_kernel(h_ptr, ga_ptr, gh_ptr, N, F, SWIGLU: tl.constexpr, BLOCK: tl.constexpr):
    pid_n = tl.program_id(0)
    f = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = f < F
    row = pid_n.to(tl.int64)
    ga = tl.load(ga_ptr + row * F + f, mask=m, other=0.0).to(tl.float32)
    I = 2 * F if SWIGLU else F
    g = tl.load(h_ptr + row * I + f, mask=m, other=0.0).to(tl.float32)
    u = g
    if SWIGLU:
        u = tl.load(h_ptr + row * I + F + f, mask=m, other=0.0).to(tl.float32)
    d_g, d_u = activation_grads(g, u, ga, SWIGLU)
    tl.store(gh_ptr + row * I + f, d_g.to(gh_ptr.dtype.element_ty), mask=m)
    if SWIGLU:
        tl.store(gh_ptr + row * I + F + f, d_u.to(gh_ptr.dtype.element_ty), mask=m)


@functools.lru_cache(maxsize=1024)
def _act_tiles(N: int, F: int) -> tuple[tuple[int, int], int]:
    """(grid, block) of the activation kernels over [N, F]: a program per row and block of at
    most 1024 columns; cached per shape (asked on every eager layer call)."""
    block = min(1024, next_power_of_2(F))
    return (N, cdiv(F, block)), block


class _Activation(torch.autograd.Function):
    """act(h) in one pass; backward recomputes from h (h is saved, act is not)."""

    @staticmethod
    def forward(ctx, h_NI, swiglu: bool):
        N, I = h_NI.shape
        F = I // 2 if swiglu else I
        a_NF = torch.empty(N, F, dtype=h_NI.dtype, device=h_NI.device)
        if N > 0:
            grid, block = _act_tiles(N, F)
            _act_fwd_kernel[grid](h_NI, a_NF, N, F, SWIGLU=swiglu, BLOCK=block)
        ctx.save_for_backward(h_NI)
        ctx.swiglu = swiglu
        return a_NF

    @staticmethod
    def backward(ctx, g_a_NF):
        (h_NI,) = ctx.saved_tensors
        N, I = h_NI.shape
        F = g_a_NF.shape[1]
        g_h = torch.empty_like(h_NI)
        if N > 0:
            grid, block = _act_tiles(N, F)
            _act_bwd_kernel[grid](h_NI, g_a_NF.contiguous(), g_h, N, F, SWIGLU=ctx.swiglu,
                                  BLOCK=block)
        return g_h, None


def fused_activation(h_NI: torch.Tensor, activation: str) -> torch.Tensor:
    return _Activation.apply(h_NI.contiguous(), activation == "swiglu")
