"""The dense feed-forward block: GELU MLP (GPT) or SwiGLU (Llama).

Built with a `tp` (moeflow.parallel.tensor.TensorSlice), it holds 1/tp.size of the hidden width:
the first projection column-parallel (a SwiGLU's gate and up halves each sliced), the second
row-parallel, completed by one all-reduce (moeflow.model.sliced). Both projections run as
`backends.matmul` chooses (moeflow.model.linear).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moeflow.model.linear import project
from moeflow.model.sliced import part, row_parallel
from moeflow.ops.activation import apply_activation, ffn_in_width
from moeflow.ops.backend import Backends, ChoosesBackends

if TYPE_CHECKING:  # moeflow.parallel imports the model; the model only names the type
    from moeflow.parallel.tensor import TensorSlice


class MLP(nn.Module, ChoosesBackends):
    def __init__(self, d_model: int, d_ff: int, activation: str, bias: bool,
                 backends: Backends = Backends(), tp: TensorSlice | None = None) -> None:
        super().__init__()
        self.activation = activation
        self.backends = backends
        self.tp = tp
        held = part(d_ff, tp, "d_ff")
        self.fc_in = nn.Linear(d_model, ffn_in_width(activation, held), bias=bias)
        self.fc_out = nn.Linear(held, d_model, bias=bias)
        sections = (d_ff, d_ff) if activation == "swiglu" else (d_ff,)
        self.tp_splits = {"fc_in.weight": (0, sections), "fc_in.bias": (0, sections),
                          "fc_out.weight": (1, (d_ff,))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mm = self.backends.matmul
        h = apply_activation(project(self.fc_in, x, mm), self.activation)
        return row_parallel(self.fc_out, h, self.tp, mm)
