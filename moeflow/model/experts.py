"""A layer's experts as stacked weights, one tensor per projection with a leading expert axis.

Legend: E experts (held here), D model dim, F expert ffn dim, I = F (GELU) or 2F (SwiGLU gate|up).
`w_in_EDI` holds [gate | up] for SwiGLU. The computation is delegated to moeflow.ops through the
backend chooser, by `backends.experts` ("auto" unless the model's Backends forces one).
"""

from __future__ import annotations

import torch
from torch import nn

from moeflow.ops.activation import ffn_in_width
from moeflow.ops.backend import Backends, ChoosesBackends, resolve_expert_backend


class Experts(nn.Module, ChoosesBackends):
    def __init__(self, num_experts: int, d_model: int, d_ff: int, activation: str, bias: bool,
                 backends: Backends = Backends()) -> None:
        super().__init__()
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.activation = activation
        self.backends = backends
        d_in = ffn_in_width(activation, d_ff)
        self.w_in_EDI = nn.Parameter(torch.empty(num_experts, d_model, d_in))
        self.w_out_EFD = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.b_in_EI = nn.Parameter(torch.zeros(num_experts, d_in)) if bias else None
        self.b_out_ED = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None

    def forward(self, x_ND: torch.Tensor, ends_E: torch.Tensor, parked: bool = True
                ) -> torch.Tensor:
        """`parked`: rows past ends_E[-1] may exist (dropped assignments); False when dropless."""
        fn = resolve_expert_backend(self.backends.experts, x_ND, self.w_in_EDI, self.w_out_EFD)
        return fn(x_ND, ends_E, self.w_in_EDI, self.b_in_EI, self.w_out_EFD, self.b_out_ED,
                  self.activation, parked)
