"""The dense feed-forward block: GELU MLP (GPT) or SwiGLU (Llama)."""

from __future__ import annotations

import torch
from torch import nn

from moeflow.ops.activation import apply_activation, ffn_in_width


class MLP(nn.Module):
    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool) -> None:
        super().__init__()
        self.activation = activation
        self.fc_in = nn.Linear(d_model, ffn_in_width(activation, d_ff), bias=bias)
        self.fc_out = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(apply_activation(self.fc_in(x), self.activation))
