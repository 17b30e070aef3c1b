"""Dispatch → compute → combine: moving tokens to experts and their outputs back.

A dispatcher turns (tokens, routing) into expert-sorted rows plus a small frozen `DispatchPlan`,
and later combines the expert outputs back into token order with the routing weights.
`LocalDispatcher` keeps everything on this process; the expert-parallel dispatchers in
`moeflow.parallel` exchange rows between ranks behind the same two methods.

Layout: the T·K assignments sorted by (expert, priority). Dropped assignments are parked after the
last expert's rows; they are never computed and never read back. Combining gathers each
token's K rows and sums them with their weights in a fixed order, so the result does not depend on
thread scheduling (no atomics).

Decode and prefill (issue 14): when the router's kernels have already computed the layout
(`routing.order`: the one-launch decode router, with a capacity parking the dropped rows as
sort_by_expert parks them; and the fused router's dropless path without autograd), a
dispatcher built with
`defer_gather=True` (MoELayer's own) returns the tokens unsorted with `plan.gather_N` = the
source token of each row, and the experts' up kernel gathers the rows as it loads them: no
planning and no gather launch. Otherwise without autograd (capacity routing in evaluation)
the Triton dispatch likewise only plans (permute_triton.dispatch_plan_triton) and leaves the
gather to the experts: the tiled and streaming kernels gather as they load, the grouped_mm
paths index first. Under autograd a planned layout (the one-launch router also routes training
calls of a few tokens) is gathered here, by one index_select whose backward sums each token's
rows in a Triton pass (permute_triton.gather_planned_triton). Every plan has `ends_E`,
`parked` and `gather_N` (None: x_ND holds the sorted rows), so MoELayer reads them alike from
local and expert-parallel plans.

Without autograd the combine can wait for the residual add and RMSNorm that follow the layer
(`PendingCombine`, moeflow.model.norms.add_norm): one Triton pass sums each token's K weighted
rows, adds the residual stream and normalises, the same bits as the combine kernel followed by
the add-and-norm kernel, one launch and one [T, D] round trip through memory fewer per MoE layer.

Legend: T tokens, K top-k, N = T·K assignment rows, D model dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moeflow.model.router import RoutingResult
from moeflow.ops.backend import (Backends, ChoosesBackends, records_grad,
                                  resolve_dispatch_backend)


@dataclass(frozen=True)
class RowPlacement:
    """Rows the router left unplaced (decode, see moeflow.model.router.ExpertOrder.placed): the
    experts' stream kernel finds each expert's tokens in ids_TK and writes row_TK, slots_TK
    and the plan's token_N as the router's pass 2 would have."""

    ids_TK: torch.Tensor
    slots_TK: torch.Tensor
    row_TK: torch.Tensor


@dataclass(frozen=True)
class DispatchPlan:
    token_N: torch.Tensor  # source token of each sorted row
    row_TK: torch.Tensor  # sorted row of each assignment
    ends_E: torch.Tensor  # cumulative row counts per local expert (int64)
    parked: bool  # rows past ends_E[-1] may exist (capacity dropping); False when dropless
    # The experts' rows (below ends_E[-1]) are exactly the kept assignments', one each; False for
    # a capacity-slot layout with empty slots (moeflow.parallel.dispatcher).
    packed: bool = True
    # Set when dispatch left the rows ungathered: x_ND is x_TD and row n is x_TD[gather_N[n]].
    gather_N: torch.Tensor | None = None
    # Set when the rows are not placed yet: token_N and row_TK are written by the experts.
    placement: RowPlacement | None = None


@dataclass(frozen=True)
class PendingCombine:
    """A MoE layer's output before its combine: out_TD = Σ_k kept · weight · y_ND[row_TK] in
    k order (combine_triton), left for the next residual add + norm to compute in its own pass
    (moeflow.model.norms.add_norm). `shape`: the layer's output shape ([..., D], T·D
    elements); LocalDispatcher.defer_combine says when a layer may leave it."""
    y_ND: torch.Tensor
    row_TK: torch.Tensor
    weights_TK: torch.Tensor
    kept_TK: torch.Tensor
    shape: torch.Size

    def materialize(self) -> torch.Tensor:
        """The combined output, as LocalDispatcher.combine gives it."""
        from moeflow.ops.permute_triton import combine_triton
        return combine_triton(self.y_ND, self.weights_TK, self.row_TK,
                              self.kept_TK).view(self.shape)


def sort_by_expert(routing: RoutingResult) -> DispatchPlan:
    T, K = routing.ids_TK.shape
    E = routing.num_experts
    # Key = expert * (T·K) + priority slot: expert-major, then queue order; dropped keys last.
    key_TK = routing.ids_TK * (T * K) + routing.slots_TK
    index_N = torch.arange(T * K, device=key_TK.device)
    if routing.capacity is not None:  # dropless routing keeps every assignment: nothing parks
        key_TK = torch.where(routing.kept_TK, key_TK, E * T * K + index_N.view(T, K))
    order_N = torch.argsort(key_TK.reshape(-1))
    row_TK = torch.empty_like(order_N).index_put_((order_N,), index_N)
    return DispatchPlan(token_N=order_N // K if K > 1 else order_N, row_TK=row_TK.view(T, K),
                        ends_E=torch.cumsum(routing.counts_E, 0),
                        parked=routing.capacity is not None)


def combine_rows(y_ND: torch.Tensor, plan: DispatchPlan, routing: RoutingResult) -> torch.Tensor:
    """out_TD = Σ_k weight_TK · y[row_TK] over kept assignments."""
    y_TKD = y_ND[plan.row_TK]
    w_TK = routing.weights_TK.to(y_ND.dtype)
    if plan.parked:  # dropped assignments read parked rows, whose contents are not outputs
        y_TKD = y_TKD.masked_fill(~routing.kept_TK.unsqueeze(2), 0)
    y_TKD = y_TKD * w_TK.unsqueeze(2)
    # K = 1: the sum over one term is that term; a view instead of a reduction
    return y_TKD.squeeze(1) if y_TKD.shape[1] == 1 else y_TKD.sum(dim=1)


class LocalDispatcher(nn.Module, ChoosesBackends):
    """All experts live on this process. `backends.dispatch` ("auto", "reference" or "triton")
    picks the implementation through moeflow.ops.backend.resolve_dispatch_backend. A module
    without parameters, so that it is part of the model it serves (set_backends reaches it).
    `defer_gather`: the caller hands x_ND to experts that can gather their rows themselves
    (MoELayer does; the expert-parallel dispatchers, which send x_ND to other ranks, do not)."""

    def __init__(self, backends: Backends = Backends(), defer_gather: bool = False) -> None:
        super().__init__()
        self.backends = backends
        self.defer_gather = defer_gather

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult
                 ) -> tuple[torch.Tensor, DispatchPlan]:
        if resolve_dispatch_backend(self.backends.dispatch, x_TD) == "triton":
            order = routing.order
            # training: gather with a backward (requires_grad first: no call when serving)
            if order is not None and x_TD.requires_grad and records_grad(x_TD):
                from moeflow.ops.permute_triton import gather_planned_triton
                plan = DispatchPlan(token_N=order.token_N, row_TK=order.row_TK,
                                    ends_E=order.ends_E, parked=routing.capacity is not None)
                return gather_planned_triton(x_TD, plan.token_N, plan.row_TK,
                                             routing.kept_TK), plan
            if order is not None:  # the router's kernels planned the layout
                placement = None
                if not order.placed:
                    if not self.defer_gather:
                        raise ValueError("LocalDispatcher: the routing left its rows for the "
                                         "experts' kernel to place; that needs defer_gather")
                    placement = RowPlacement(routing.ids_TK, routing.slots_TK, order.row_TK)
                gather_N = order.token_N if self.defer_gather else None
                plan = DispatchPlan(token_N=order.token_N, row_TK=order.row_TK,
                                    ends_E=order.ends_E, parked=routing.capacity is not None,
                                    gather_N=gather_N, placement=placement)
                return (x_TD if self.defer_gather else x_TD[order.token_N]), plan
            may_drop = routing.capacity is not None
            if self.defer_gather and not records_grad(x_TD):
                from moeflow.ops.permute_triton import dispatch_plan_triton
                row_TK, token_N, ends_E = dispatch_plan_triton(
                    x_TD, routing.ids_TK, routing.slots_TK, routing.kept_TK, routing.counts_E,
                    may_drop)
                return x_TD, DispatchPlan(token_N=token_N, row_TK=row_TK, ends_E=ends_E,
                                          parked=may_drop, gather_N=token_N)
            from moeflow.ops.permute_triton import dispatch_triton
            x_ND, row_TK, token_N, ends_E = dispatch_triton(
                x_TD, routing.ids_TK, routing.slots_TK, routing.kept_TK, routing.counts_E,
                may_drop=may_drop)
            return x_ND, DispatchPlan(token_N=token_N, row_TK=row_TK, ends_E=ends_E,
                                      parked=may_drop)
        if routing.order is not None and not routing.order.placed:
            raise ValueError("LocalDispatcher: the routing left its rows for the experts' "
                             "kernel to place; that needs the Triton dispatch")
        plan = sort_by_expert(routing)
        return x_TD[plan.token_N], plan

    def defer_combine(self, y_ND: torch.Tensor, plan: DispatchPlan, routing: RoutingResult,
                      shape: torch.Size) -> PendingCombine | None:
        """The combine left for the next add + norm (PendingCombine), where this dispatcher
        would run the Triton combine and autograd records nothing; else None."""
        if (records_grad(y_ND, routing.weights_TK)
                or resolve_dispatch_backend(self.backends.dispatch, y_ND) != "triton"):
            return None
        return PendingCombine(y_ND.contiguous(), plan.row_TK, routing.weights_TK.contiguous(),
                              routing.kept_TK.contiguous(), shape)

    def combine(self, y_ND: torch.Tensor, plan: DispatchPlan, routing: RoutingResult
                ) -> torch.Tensor:
        if resolve_dispatch_backend(self.backends.dispatch, y_ND) == "triton":
            from moeflow.ops.permute_triton import combine_triton
            return combine_triton(y_ND, routing.weights_TK, plan.row_TK, routing.kept_TK,
                                  packed=plan.packed)
        return combine_rows(y_ND, plan, routing)
