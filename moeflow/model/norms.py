"""Normalisation layers: LayerNorm for the GPT family, RMSNorm for the Llama family."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.ops.backend import Backends, ChoosesBackends
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
        return rms_norm(x, self.weight, self.eps, fuse=self.backends.fuse)


def make_norm(arch: str, dim: int, eps: float, backends: Backends = Backends()) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if arch == "gpt" else RMSNorm(dim, eps, backends)
