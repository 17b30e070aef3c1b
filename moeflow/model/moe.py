"""The MoE feed-forward layer: router → dispatch → experts → combine, plus the dense branches.

Variants (see FFNSpec): plain MoE; Residual-MoE (DeepSpeed-MoE's PR-MoE layers): a fixed dense MLP
and the experts mixed per token by c = softmax(Linear(d, 2)(x)), out = c0·moe(x) + c1·mlp(x);
shared experts (DeepSeek-MoE): an always-on MLP added to the routed output, optionally scaled by
sigmoid(Linear(d, 1)(x)) as in Qwen2-MoE.

One forward for every setting: only the collaborators a layer is built with change. On one
process they are a LocalDispatcher, all experts, and no statistics reduction. Under expert ×
data parallelism moeflow.parallel.shard builds each layer with its `layout` (which experts, or
expert slices, the Experts module holds), the dispatcher that exchanges tokens within the
layer's EP group, and the router's `stats_reduce` (balance counts summed over data-parallel
ranks); nothing is attached or swapped after construction.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from moeflow.config import FFNSpec
from moeflow.model.dispatch import LocalDispatcher, PendingCombine
from moeflow.model.expert_groups import TokenGroups
from moeflow.model.experts import Experts
from moeflow.model.mlp import MLP
from moeflow.model.router import Router, RoutingResult, StatsReduce
from moeflow.ops.backend import (EXPERTS_PLACE_MAX_TOKENS, Backends, ChoosesBackends,
                                  resolve_dispatch_backend)

if TYPE_CHECKING:  # moeflow.parallel imports the model; the model only names the type
    from moeflow.ops.norm_triton import PendingAddNorm
    from moeflow.parallel.mesh import LayerLayout
    from moeflow.parallel.tensor import TensorSlice


class MoELayer(nn.Module, ChoosesBackends):
    """`layout`, `dispatcher`, `stats_reduce`: the layer's share of an expert-parallel run (see
    the module docstring); the defaults hold every expert and dispatch locally. `tp`: the
    tensor slicing of the dense branches (shared experts, residual MLP), see MLP."""

    def __init__(self, spec: FFNSpec, d_model: int, activation: str, bias: bool,
                 backends: Backends = Backends(), *, layout: LayerLayout | None = None,
                 dispatcher: nn.Module | None = None, stats_reduce: StatsReduce | None = None,
                 tp: TensorSlice | None = None) -> None:
        super().__init__()
        if layout is not None and layout.ep_size > 1 and dispatcher is None:
            raise ValueError(f"layout: layer {layout.layer}'s experts are spread over "
                             f"{layout.ep_size} ranks, so it needs a dispatcher that exchanges "
                             f"tokens between them")
        self.spec = spec
        self.d_model, self.activation, self.bias = d_model, activation, bias
        self.backends = backends
        self.router = Router(d_model, spec.num_experts, spec.router, backends, stats_reduce)
        self.experts = Experts(spec.num_experts, d_model, spec.expert_d_ff, activation, bias,
                               backends, layout)
        self.dispatcher = (LocalDispatcher(backends, defer_gather=True) if dispatcher is None
                           else dispatcher)
        self.shared = (MLP(d_model, spec.shared_d_ff, activation, bias, backends, tp)
                       if spec.shared_d_ff else None)
        self.shared_gate = nn.Linear(d_model, 1, bias=False) if spec.shared_expert_gate else None
        residual = spec.kind == "residual_moe"
        self.residual_mlp = (MLP(d_model, spec.d_ff, activation, bias, backends, tp) if residual
                             else None)
        self.residual_coef = nn.Linear(d_model, 2) if residual else None

    def forward(self, x_BTD: torch.Tensor, inference: bool = False,
                groups: TokenGroups | None = None, logits_TE: torch.Tensor | None = None,
                defer_combine: bool = False, norm_input: PendingAddNorm | None = None
                ) -> tuple[torch.Tensor | PendingCombine, RoutingResult]:
        """`inference`: route dropless and without noise (see moeflow.model.router); `groups`:
        each token's expert group (moeflow.model.expert_groups); `logits_TE`: routing logits
        from the model's lookahead router (moeflow.model.lookahead) instead of this layer's.
        `defer_combine`: return the output as a PendingCombine where the local dispatcher can
        leave its combine to the next add + norm (moeflow.model.dispatch) and nothing is added
        to it here (no shared experts, no residual MLP). `norm_input`: x_BTD is
        norm_input.y, the add + norm ahead of the layer not yet run; the router computes it
        (in its decode kernel where that runs) before anything reads x."""
        x_TD = x_BTD.reshape(-1, x_BTD.shape[-1])
        routing = self.router(x_TD, inference=inference, groups=groups, logits_TE=logits_TE,
                              experts_place=inference and self._experts_place(x_TD),
                              norm_input=norm_input)
        x_ND, plan = self.dispatcher.dispatch(x_TD, routing)
        y_ND = self._run_experts(x_ND, plan)
        if (defer_combine and self.shared is None and self.residual_mlp is None
                and isinstance(self.dispatcher, LocalDispatcher)):
            pending = self.dispatcher.defer_combine(y_ND, plan, routing, x_BTD.shape)
            if pending is not None:
                return pending, routing
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

    def _experts_place(self, x_TD: torch.Tensor) -> bool:
        """Whether this call's experts can place the rows themselves, so that the router
        may leave them (decode: moeflow.ops.decode_route_fused_triton's place_rows, the
        router's pass 2 moved into the experts' one-launch kernel): the local dispatcher hands
        the tokens over ungathered through the Triton dispatch, and the experts run the stream
        kernel."""
        d = self.dispatcher
        return (isinstance(d, LocalDispatcher) and d.defer_gather
                and x_TD.shape[0] <= EXPERTS_PLACE_MAX_TOKENS
                and resolve_dispatch_backend(d.backends.dispatch, x_TD) == "triton"
                and isinstance(self.experts, Experts)
                and self.experts.places_rows(x_TD, x_TD.shape[0] * self.router.config.top_k))

    def _run_experts(self, x_ND: torch.Tensor, plan) -> torch.Tensor:
        """The experts over the dispatched rows. Rows left ungathered (`plan.gather_N`, the
        decode path) are gathered by Experts' kernels as they load them; an experts module of
        another kind (the offload engine's, moeflow.infer.offload) gets them gathered here."""
        if plan.gather_N is None:
            return self.experts(x_ND, plan.ends_E, plan.parked)
        if isinstance(self.experts, Experts):
            return self.experts(x_ND, plan.ends_E, plan.parked, rows_N=plan.gather_N,
                                placement=plan.placement)
        return self.experts(x_ND[plan.gather_N], plan.ends_E, plan.parked)
