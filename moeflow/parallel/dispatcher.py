"""Expert-parallel dispatch: the LocalDispatcher's interface, with rows exchanged between ranks.

dispatch(x_TD, routing) -> (x_ND, plan): this rank's tokens are sorted by global expert (exactly as
LocalDispatcher sorts them), sent to the ranks owning those experts, and the rows received from
every rank of the EP group are regrouped expert-major, so the local `Experts` module computes them
unchanged with `plan.ends_E` (cumulative rows per *local* expert). combine(y_ND, plan, routing)
runs the same path backwards and sums each token's K outputs with its routing weights. The local
sort and the weighted sum are a LocalDispatcher's (Triton on CUDA, as on one process). Autograd
flows through both exchanges.

Experts are laid out contiguously (global expert g on EP position g // El), so rows sorted by
global expert are already grouped by destination rank. With expert slicing (El = 1, s ranks per
expert), the rows of expert e are sent to all s ranks holding its slices and the s partial outputs
are summed on the way back.

Exchanges (ParallelConfig.exchange, chosen per call in `_use_capacity`):
* "uneven": only the kept rows travel; split sizes are exchanged first. Dropless needs this.
* "capacity": every rank sends exactly `capacity` slots per expert (zero rows where an expert got
  fewer tokens), DeepSpeed's layout: no count exchange, fixed message sizes, wasted work on
  padding. Capacity is agreed on as the maximum over the EP group, so ranks with different batch
  sizes still exchange equal buffers. Dropping itself stays per rank (as in DeepSpeed): each rank
  drops from its own tokens, so capacity-limited runs are not layout-independent.

Legend: T tokens, K top-k, N rows, D model dim, E experts (global), El experts per rank,
P ranks in the layer's EP group, C capacity, s slices per expert.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeflow.model.dispatch import DispatchPlan, LocalDispatcher
from moeflow.model.router import RoutingResult
from moeflow.ops.backend import Backends
from moeflow.parallel.all_to_all import (all_to_all, chunk_index, exchange_counts, gather_counts,
                                         hierarchical_all_to_all, transpose_chunks)
from moeflow.parallel.mesh import ExchangeGroups, LayerLayout


@dataclass(frozen=True)
class ExchangePlan:
    ends_E: torch.Tensor  # cumulative received rows per local expert (what Experts needs)
    local: DispatchPlan  # this rank's sort of its own assignments
    send_splits: list[int]  # rows sent to each EP position
    recv_splits: list[int]  # rows received from each EP position
    counts_PP: torch.Tensor | None  # full [src, dst] row matrix (hierarchical only)
    regroup_N: torch.Tensor | None  # received (src, expert) order -> (expert, src) order
    unregroup_N: torch.Tensor | None  # its inverse
    send_index: torch.Tensor | None  # sorted row behind each sent row (slicing), None: identity
    num_kept: int
    capacity: int | None  # fixed-capacity exchange: slots per expert
    # The rows dispatch returned: combine ties the experts' output to them (see _TieToRows).
    rows: torch.Tensor | None = None
    # No rows past ends_E[-1]: the uneven exchange sends only kept rows, the capacity exchange
    # pads inside each expert's block (padding rows are computed but never read back).
    parked: bool = False
    gather_N: torch.Tensor | None = None  # received rows are gathered (moeflow.model.dispatch)


class _TieToRows(torch.autograd.Function):
    """Identity on y_ND that also makes the received rows an autograd input of the combine.

    A rank whose experts receive no rows (or an expert path that skips empty experts) computes
    an output with no autograd path back to the rows it received; its backward would then skip
    the dispatch exchange's backward while the other ranks wait in theirs (a hang under NCCL).
    With the tie, every rank runs every exchange backward."""

    @staticmethod
    def forward(ctx, y_ND: torch.Tensor, rows_ND: torch.Tensor) -> torch.Tensor:
        return y_ND.view_as(y_ND)

    @staticmethod
    def backward(ctx, grad_ND):
        return grad_ND, None


class AllToAllDispatcher(nn.Module):
    """Dispatcher for one MoE layer whose experts are spread over an EP group; a module without
    parameters, like LocalDispatcher, whose `backends` its `local` dispatcher holds."""

    def __init__(self, layout: LayerLayout, groups: ExchangeGroups, exchange: str = "auto",
                 hierarchical: bool = False, backends: Backends = Backends()) -> None:
        super().__init__()
        self.layout = layout
        self.groups = groups
        self.exchange = exchange
        self.hierarchical = hierarchical and groups.ranks_per_node > 0
        # This rank's own sort by expert (uneven exchange) and weighted combine (both): the
        # implementations of one process (on CUDA Triton's mapping-table gather, whose backward
        # sums each token's rows without an accumulating scatter, and the fused combine).
        self.local = LocalDispatcher(backends)

    # ---- the two exchanges -------------------------------------------------------------------
    def _send(self, x_ND, send_splits, recv_splits, counts_PP):
        if self.hierarchical:
            g = self.groups
            return hierarchical_all_to_all(x_ND, counts_PP, self.layout.position, g.intra,
                                           g.inter, g.ranks_per_node)
        return all_to_all(x_ND, send_splits, recv_splits, self.groups.ep)

    def _return(self, y_ND, plan: ExchangePlan):
        if self.hierarchical:
            g = self.groups
            return hierarchical_all_to_all(y_ND, plan.counts_PP.t(), self.layout.position,
                                           g.intra, g.inter, g.ranks_per_node)
        return all_to_all(y_ND, plan.recv_splits, plan.send_splits, self.groups.ep)

    def _use_capacity(self, routing: RoutingResult) -> bool:
        if self.exchange == "capacity" and routing.capacity is None:
            raise ValueError("exchange='capacity' needs a router with capacity (dropless=False)")
        return self.exchange == "capacity" or (self.exchange == "auto"
                                               and routing.capacity is not None)

    # ---- dispatch ----------------------------------------------------------------------------
    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult
                 ) -> tuple[torch.Tensor, ExchangePlan]:
        if self._use_capacity(routing):
            return self._dispatch_capacity(x_TD, routing)
        lay = self.layout
        P, s = lay.ep_size, lay.slices
        El = len(lay.expert_ids)
        x_sorted_ND, local = self.local.dispatch(x_TD, routing)
        counts_E = routing.counts_E
        send_index = None
        if s > 1:
            starts_E = torch.cumsum(counts_E, 0) - counts_E
            expert_P = torch.arange(P, device=counts_E.device) // s
            send_PX = counts_E[expert_P].view(P, 1)
            send_index = chunk_index(starts_E[expert_P], send_PX.view(-1))
        else:
            send_PX = counts_E.view(P, El)

        counts_PP = None
        if self.hierarchical:
            full_PPX = gather_counts(send_PX, self.groups.ep)
            counts_PP = full_PPX.sum(-1)
            recv_PX = full_PPX[:, lay.position]
        else:
            recv_PX = exchange_counts(send_PX, self.groups.ep)
        host = torch.cat([send_PX.sum(1), recv_PX.sum(1), counts_E.sum().view(1)]).tolist()
        send_splits, recv_splits, num_kept = host[:P], host[P:2 * P], host[-1]

        x_send = x_sorted_ND[:num_kept]  # kept rows come first, dropped ones are parked after
        if send_index is not None:
            x_send = x_send[send_index]
        x_recv = self._send(x_send, send_splits, recv_splits, counts_PP)
        regroup = transpose_chunks(recv_PX)
        unregroup = transpose_chunks(recv_PX.t().contiguous())
        ends_E = torch.cumsum(recv_PX.sum(0), 0)
        x_ND = x_recv[regroup]
        plan = ExchangePlan(ends_E, local, send_splits, recv_splits, counts_PP, regroup,
                            unregroup, send_index, num_kept, None, rows=x_ND)
        return x_ND, plan

    def _dispatch_capacity(self, x_TD, routing):
        lay = self.layout
        P, s = lay.ep_size, lay.slices
        El = len(lay.expert_ids)
        E, D = routing.num_experts, x_TD.shape[-1]
        C = routing.capacity
        if P > 1:
            cap = torch.tensor([C], device=x_TD.device)
            dist.all_reduce(cap, op=dist.ReduceOp.MAX, group=self.groups.ep)
            C = int(cap.item())
        T, K = routing.ids_TK.shape
        pos_TK = routing.ids_TK * C + routing.slots_TK.clamp_max(C - 1)
        kept = routing.kept_TK.reshape(-1)
        token_N = torch.arange(T, device=x_TD.device).repeat_interleave(K)[kept]
        buf = x_TD.new_zeros(E * C, D).index_copy(0, pos_TK.reshape(-1)[kept], x_TD[token_N])
        if s > 1:
            buf = buf.view(E, 1, C, D).expand(E, s, C, D).reshape(P * C, D)
        splits = [El * C] * P
        counts_PP = torch.full((P, P), El * C, device=x_TD.device) if self.hierarchical else None
        x_recv = self._send(buf, splits, splits, counts_PP)
        x_ND = x_recv.view(P, El, C, D).transpose(0, 1).reshape(El * P * C, D)
        ends_E = torch.arange(1, El + 1, device=x_TD.device) * (P * C)
        local = DispatchPlan(token_N=token_N, row_TK=pos_TK, ends_E=ends_E, parked=False,
                             packed=False)
        plan = ExchangePlan(ends_E, local, splits, splits, counts_PP, None, None, None,
                            int(kept.sum()), C, rows=x_ND)
        return x_ND, plan

    # ---- combine -----------------------------------------------------------------------------
    def combine(self, y_ND: torch.Tensor, plan: ExchangePlan, routing: RoutingResult
                ) -> torch.Tensor:
        lay = self.layout
        P, s = lay.ep_size, lay.slices
        El = len(lay.expert_ids)
        D = y_ND.shape[-1]
        if plan.rows is not None and plan.rows.requires_grad:
            y_ND = _TieToRows.apply(y_ND, plan.rows)
        if plan.capacity is not None:
            C = plan.capacity
            y = y_ND.view(El, P, C, D).transpose(0, 1).reshape(P * El * C, D)
            y = self._return(y, plan)
            if s > 1:
                y = y.view(P // s, s, C, D).sum(1).reshape(-1, D)
            return self.local.combine(y, plan.local, routing)
        y_back = self._return(y_ND[plan.unregroup_N], plan)
        if plan.send_index is not None:
            y_back = y_back.new_zeros(plan.num_kept, D).index_add(0, plan.send_index, y_back)
        T, K = routing.ids_TK.shape
        if plan.num_kept < T * K:  # rows for the parked (dropped) assignments, never weighted in
            y_back = torch.cat([y_back, y_back.new_zeros(T * K - plan.num_kept, D)])
        return self.local.combine(y_back, plan.local, routing)
