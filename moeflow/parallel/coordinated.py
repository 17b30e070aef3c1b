"""The parallelism-coordinated all-to-all (DeepSpeed-MoE inference, section 5.3).

At inference every rank of a tensor-slicing group holds the same tokens after attention's
all-reduce, and with the engine's broadcast batch every rank holds the same tokens anyway. The
plain exchange sends all of them from every rank: each expert receives, and computes, the same
rows once per rank that sent them. Coordinated, the ranks split the tokens: rank r exchanges
only its 1/R share (its rows of the routing, which every rank computed whole), the experts
compute each row once, and one all-gather of the combined outputs gives every rank all tokens
again. Message sizes and expert work drop by R; the price is the all-gather of T×D outputs.

`CoordinatedDispatcher` wraps the expert-parallel dispatcher (moeflow.parallel.dispatcher) behind
the same dispatch/combine interface, so MoELayer does not know which one it has. Shares are
contiguous token ranges of ceil(T/R) tokens (the last ones shorter, possibly empty: every rank
still takes part in every exchange, with zero rows); the all-gather pads them to equal size.
Inference only (dropless routing; no autograd through the all-gather).

Legend: T tokens, K top-k, E experts, D model dim, N rows, R ranks sharing the tokens.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moeflow.model.router import RoutingResult


def share_bounds(T: int, ranks: int, rank: int) -> tuple[int, int]:
    """Token range [start, end) of `rank`'s share of T tokens split over `ranks`."""
    size = -(-T // ranks)
    return min(rank * size, T), min((rank + 1) * size, T)


def routing_rows(routing: RoutingResult, start: int, end: int) -> RoutingResult:
    """The routing of tokens [start, end) alone: ids and weights as chosen for the whole batch,
    queue slots and counts renumbered within the share (dropless routing only)."""
    if routing.capacity is not None:
        raise ValueError("the coordinated all-to-all needs dropless routing (inference)")
    ids_TK = routing.ids_TK[start:end]
    T, K = ids_TK.shape
    E = routing.num_experts
    # Slot = rank of the assignment among its expert's, in (choice, token) order.
    one_hot_NE = torch.nn.functional.one_hot(ids_TK.t().reshape(-1), E)
    slots_KT = (one_hot_NE.cumsum(0) - 1).gather(1, ids_TK.t().reshape(-1, 1)).view(K, T)
    return dataclasses.replace(
        routing, ids_TK=ids_TK, weights_TK=routing.weights_TK[start:end],
        kept_TK=routing.kept_TK[start:end], slots_TK=slots_KT.t().contiguous(),
        counts_E=one_hot_NE.sum(0), num_dropped=routing.num_dropped.new_zeros(()),
        order=None)  # the whole batch's layout is not the share's


@dataclass(frozen=True)
class CoordinatedPlan:
    inner: object  # the wrapped dispatcher's plan for this rank's share
    routing: RoutingResult  # this rank's share of the routing
    num_tokens: int  # T, the whole batch

    @property
    def ends_E(self) -> torch.Tensor:
        return self.inner.ends_E

    @property
    def parked(self) -> bool:
        return self.inner.parked

    @property
    def gather_N(self) -> torch.Tensor | None:
        return self.inner.gather_N


class CoordinatedDispatcher(nn.Module):
    """Dispatch only this rank's share of the tokens through `inner`; combine, then all-gather
    the shares over `group` (the R ranks that hold the same tokens; `rank` is this one's index
    in it)."""

    def __init__(self, inner: nn.Module, group, ranks: int, rank: int) -> None:
        super().__init__()
        self.inner, self.group, self.ranks, self.rank = inner, group, ranks, rank

    def dispatch(self, x_TD: torch.Tensor, routing: RoutingResult
                 ) -> tuple[torch.Tensor, CoordinatedPlan]:
        start, end = share_bounds(x_TD.shape[0], self.ranks, self.rank)
        share = routing_rows(routing, start, end)
        x_ND, inner = self.inner.dispatch(x_TD[start:end], share)
        return x_ND, CoordinatedPlan(inner, share, x_TD.shape[0])

    def combine(self, y_ND: torch.Tensor, plan: CoordinatedPlan, routing: RoutingResult
                ) -> torch.Tensor:
        y_sD = self.inner.combine(y_ND, plan.inner, plan.routing)
        T = plan.num_tokens
        size = -(-T // self.ranks)
        padded = y_sD.new_zeros(size, y_sD.shape[-1])
        padded[:y_sD.shape[0]] = y_sD
        parts = [torch.empty_like(padded) for _ in range(self.ranks)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat(parts)[:T]
