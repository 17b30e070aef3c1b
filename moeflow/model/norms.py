"""Normalisation layers: LayerNorm for the GPT family, RMSNorm for the Llama family.

RMSNorm runs one of three implementations of the same math, chosen per call by the model's
Backends: plain torch (the reference), its torch.compile twin (moeflow.ops.fused; with
elementwise="reference", small inputs on CUDA) or a one-pass Triton kernel (on CUDA without
autograd, moeflow.ops.norm_triton). `add_norm` is the residual update followed by the next
norm, which the Triton path does in the same pass, a MoE layer's combine included.
"""

from __future__ import annotations

import torch
from torch import nn

from moeflow.model.dispatch import PendingCombine
from moeflow.ops.backend import Backends, ChoosesBackends, resolve_elementwise_backend
from moeflow.ops.fused import fused


@fused
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, computed in fp32, returned in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * weight.float()).to(x.dtype)


class RMSNorm(nn.Module, ChoosesBackends):
    def __init__(self, dim: int, eps: float = 1e-6, backends: Backends = Backends()) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backends = backends

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve_elementwise_backend(self.backends.elementwise, x) == "triton":
            from moeflow.ops.norm_triton import rms_norm_triton
            return rms_norm_triton(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps, fuse=self.backends.fuse)


def add_norm(norm: nn.Module, x: torch.Tensor, h: torch.Tensor | PendingCombine
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + h, norm(x + h)): the residual stream's update and its normalised value; one Triton
    pass when `norm` is an RMSNorm whose backend picks it, else exactly the two plain steps.
    `h` may be a MoE layer's PendingCombine: the Triton pass combines its rows first (the same
    bits as the combine kernel's output), the plain steps combine it with that kernel."""
    if (isinstance(norm, RMSNorm) and h.shape == x.shape and _dtype(h) == x.dtype
            and resolve_elementwise_backend(norm.backends.elementwise, x) == "triton"):
        from moeflow.ops.norm_triton import add_combine_rms_norm_triton, add_rms_norm_triton
        if isinstance(h, PendingCombine):
            return add_combine_rms_norm_triton(x, h.y_ND, h.row_TK, h.weights_TK, h.kept_TK,
                                               norm.weight, norm.eps)
        return add_rms_norm_triton(x, h, norm.weight, norm.eps)
    x = x + (h.materialize() if isinstance(h, PendingCombine) else h)
    return x, norm(x)


def pending_add_norm(norm: nn.Module, x: torch.Tensor, h: torch.Tensor):
    """add_norm(norm, x, h) left for its consumer to run (moeflow.ops.norm_triton.
    PendingAddNorm: the MoE router's decode kernel computes it with the routing logits), or
    None where that pass is not the one add_norm would take (another norm, backend or dtype)."""
    if not (isinstance(norm, RMSNorm) and isinstance(h, torch.Tensor) and h.shape == x.shape
            and h.dtype == x.dtype
            and resolve_elementwise_backend(norm.backends.elementwise, x) == "triton"):
        return None
    from moeflow.ops.norm_triton import PendingAddNorm
    return PendingAddNorm.of(x, h, norm.weight, norm.eps)


def _dtype(h: torch.Tensor | PendingCombine) -> torch.dtype:
    return h.y_ND.dtype if isinstance(h, PendingCombine) else h.dtype


def make_norm(arch: str, dim: int, eps: float, backends: Backends = Backends()) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if arch == "gpt" else RMSNorm(dim, eps, backends)
