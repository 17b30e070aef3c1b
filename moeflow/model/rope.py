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


class RopeTables:
    """rope_cos_sin of every position below `max_len`, computed once per (device, dtype) and
    then looked up: a step's cos and sin are two index reads (a slice when the positions are
    0..T-1) instead of the ~11 small kernels that computing them takes (the arange, the power,
    the reciprocal, the products, the concatenation, cos, sin and the casts: ~16 µs of each
    batch-1 decode step on an H200, benchmarks/results/decode_timeline). The values are
    rope_cos_sin's, bit for bit: the same elementwise fp32 arithmetic per position. While a
    CUDA graph is being captured a missing table is not built (its kernels would only be
    recorded): those positions take rope_cos_sin itself. Built outside inference mode, so a
    model served under torch.inference_mode() still trains afterwards. Not module state: the
    tables follow the positions' device, not .to()."""

    def __init__(self, head_dim: int, theta: float, max_len: int) -> None:
        self.head_dim, self.theta, self.max_len = head_dim, theta, max_len
        self._tables: dict[tuple[torch.device, torch.dtype],
                           tuple[torch.Tensor, torch.Tensor]] = {}

    def _table(self, device: torch.device, dtype: torch.dtype
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
        table = self._tables.get((device, dtype))
        if table is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return None
            with torch.inference_mode(False), torch.no_grad():  # usable by autograd later
                table = rope_cos_sin(torch.arange(self.max_len, device=device), self.head_dim,
                                     self.theta, dtype)
            self._tables[(device, dtype)] = table
        return table

    def at(self, positions: torch.Tensor, dtype: torch.dtype
           ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [*positions.shape, head_dim] for integer positions below max_len."""
        table = self._table(positions.device, dtype)
        if table is None:
            return rope_cos_sin(positions, self.head_dim, self.theta, dtype)
        return table[0][positions], table[1][positions]

    def first(self, T: int, device: torch.device, dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [1, T, head_dim] of positions 0..T-1 (T ≤ max_len): views of the tables."""
        table = self._table(torch.device(device), dtype)
        if table is None:
            return rope_cos_sin(torch.arange(T, device=device)[None], self.head_dim,
                                self.theta, dtype)
        return table[0][None, :T], table[1][None, :T]


@fused
def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleave: bool = False) -> torch.Tensor:
    """x: [B, H, T, hd]; cos, sin: [B, T, hd] (or broadcastable)."""
    if interleave:
        x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)
