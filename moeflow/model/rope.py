"""Rotary position embeddings (Llama family), half-split layout as in HF transformers.

DeepSeek rotates adjacent pairs (x0, x1), (x2, x3), ... instead of the two halves
(`interleave=True`): the pairs are gathered into halves first, so the rotated output is in
half-split order. Queries and keys get the same permutation, so attention scores are unchanged.
"""

from __future__ import annotations

import torch

from moeflow.ops.fused import fused


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] for integer `positions`."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device,
                                             dtype=torch.float32) / head_dim))
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


@fused
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleave: bool = False) -> torch.Tensor:
    """x: [B, H, T, hd]; cos, sin: [B, T, hd] (or broadcastable)."""
    if interleave:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
