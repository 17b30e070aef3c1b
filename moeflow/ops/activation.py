"""The FFN activations shared by dense MLPs and experts.

"gelu": h -> gelu(h). "swiglu": h = [gate | up] (width 2F) -> silu(gate) * up (width F).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "swiglu")


def ffn_in_width(activation: str, d_ff: int) -> int:
    """Width of the first projection: SwiGLU projects to gate and up at once."""
    return 2 * d_ff if activation == "swiglu" else d_ff


def apply_activation(h: torch.Tensor, activation: str) -> torch.Tensor:
    if activation == "swiglu":
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.gelu(h)
