"""The MoE feed-forward layer: router → dispatch → experts → combine, plus the dense branches.

Variants (see FFNSpec): plain MoE; Residual-MoE (DeepSpeed-MoE's PR-MoE layers): a fixed dense MLP
and the experts mixed per token by c = softmax(Linear(d, 2)(x)), out = c0·moe(x) + c1·mlp(x);
shared experts (DeepSeek-MoE): an always-on MLP added to the routed output, optionally scaled by
sigmoid(Linear(d, 1)(x)) as in Qwen2-MoE.
"""

from __future__ import annotations

import torch
from torch import nn

from moeflow.config import FFNSpec
from moeflow.model.dispatch import LocalDispatcher
from moeflow.model.experts import Experts
from moeflow.model.mlp import MLP
from moeflow.model.router import Router, RoutingResult
from moeflow.ops.backend import Backends, ChoosesBackends


class MoELayer(nn.Module, ChoosesBackends):
    def __init__(self, spec: FFNSpec, d_model: int, activation: str, bias: bool,
                 backends: Backends = Backends()) -> None:
        super().__init__()
        self.spec = spec
        self.backends = backends  # handed to an expert-parallel dispatcher that replaces ours
        self.router = Router(d_model, spec.num_experts, spec.router, backends)
        self.experts = Experts(spec.num_experts, d_model, spec.expert_d_ff, activation, bias,
                               backends)
        self.dispatcher = LocalDispatcher(backends)
        self.shared = MLP(d_model, spec.shared_d_ff, activation, bias) if spec.shared_d_ff else None
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if spec.shared_expert_gate else None
        residual = spec.kind == "residual_moe"
        self.residual_mlp = MLP(d_model, spec.d_ff, activation, bias) if residual else None
        self.residual_coef = nn.Linear(d_model, 2) if residual else None

    def forward(self, x_BTD: torch.Tensor, inference: bool = False
                ) -> tuple[torch.Tensor, RoutingResult]:
        """`inference`: route dropless and without noise (see moeflow.model.router)."""
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = self.router(x_TD, inference=inference)
        x_ND, plan = self.dispatcher.dispatch(x_TD, routing)
        y_ND = self.experts(x_ND, plan.ends_E, plan.parked)
        y_TD = self.dispatcher.combine(y_ND, plan, routing)
        if self.shared is not None:
            shared_TD = self.shared(x_TD)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD))
            y_TD = y_TD + shared_TD
        if self.residual_mlp is not None:
            coef_T2 = torch.softmax(self.residual_coef(x_TD), dim=-1)
            y_TD = y_TD * coef_T2[:, :1] + self.residual_mlp(x_TD) * coef_T2[:, 1:]
        return y_TD.view_as(x_BTD), routing
