"""Token → expert routing, DeepSpeed-MoE's gating by default, returning one frozen `RoutingResult`.

Steps (all in fp32): logits = x·Wg → (NaN/inf made finite) → scores (softmax or sigmoid) →
choices (`select_experts`: see RouterConfig's docstring for the rule and its DeepSpeed origin)
→ queue slots in priority order → capacity: each expert keeps its first `capacity` assignments
and drops the rest → weights: the chosen experts' *unbiased* scores, zero where dropped,
optionally renormalised over the kept routes (DeepSpeed's top-2: a token whose second route was
dropped gives its first route weight 1), then scaled.

Priority order: all first choices before any second choice (GShard/DeepSpeed top-2), and within
one choice rank, tokens in position order ("position") or in a random order drawn from the torch
RNG ("random", Random Token Selection) — seed the RNG or pass a generator to reproduce it.

Inference routing (`forward(..., inference=True)`, passed down from `model(ids, inference=True)`
by the serving engine and by a distillation teacher): no capacity and no noise, so a token's
output never depends on its batch-mates or on the RNG. It is an argument of each call, not a
flag set on the module, so a model shared between a trainer and an engine routes each call as
its caller declares. Without autograd, Gumbel noise, Random Token Selection or statistics summed
over ranks (served calls, and calls with a capacity such as eval-mode forwards), a decode-sized
call can also take the one-launch kernel that returns the expert-sorted layout with the choices
(`order`, see moeflow.ops.decode_route_triton and the router chooser in moeflow.ops.backend).

Losses are returned unweighted and weighted: aux = E · Σ_e f_e · P_e (Switch/GShard), with f_e the
fraction of counted assignments (before dropping; first choices only for DeepSpeed's top-2) that
went to e, and P_e its mean score; z = mean(logsumexp(logits)²). A loss whose coefficient is 0
is detached: huge logits can make z overflow to inf, and 0·inf would poison the objective.
Under data parallelism the router is built with a `stats_reduce` (moeflow.parallel gives it one
that sums over the data-parallel ranks): the routing path applies it to the balance counts
before it computes the aux loss, so f_e is the global batch's fraction and the rank-averaged loss
equals the loss of the whole batch in one process, whatever the split. P_e stays this rank's
mean and f_e carries no gradient, so nothing else changes; the loss is computed once, by
whichever path routes (the fused kernel included), at the cost of one all-reduce of E counts.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F
from torch.amp.autocast_mode import is_autocast_available
from torch import nn

from moeflow.config import RouterConfig
from moeflow.model.expert_groups import (GroupRouting, TokenGroups, group_routing,
                                         grouped_aux_loss)
from moeflow.ops.backend import (EXPERTS_PLACE_MAX_TOKENS, Backends, ChoosesBackends,
                                 one_launch_bound, records_grad, resolve_router_backend,
                                 router_fuses_logits)
from moeflow.ops.device_counters import DeviceCounters

if TYPE_CHECKING:  # imports Triton; only the decode path, which has it, makes one
    from moeflow.ops.norm_triton import PendingAddNorm

# DeepSpeed clamps a token's weight sum at fp32 eps before renormalising.
NORM_EPS = torch.finfo(torch.float32).eps

# counts_E -> counts_E summed over the data-parallel ranks, as a new tensor (Router's stats_reduce)
StatsReduce = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ExpertOrder:
    """The expert-sorted layout of a routing (moeflow.model.dispatch's DispatchPlan, as
    sort_by_expert builds it: with a capacity, the dropped assignments' rows follow
    ends_E[-1] in (token, choice) order), when the routing kernel computed it with the choices
    (moeflow.ops.decode_route_triton)."""

    row_TK: torch.Tensor  # int64 sorted row of each assignment
    token_N: torch.Tensor  # int64 source token of each sorted row
    ends_E: torch.Tensor  # int64 cumulative rows per expert
    # False: row_TK, token_N and the RoutingResult's slots_TK are not written yet; the experts'
    # weight-streaming kernel writes them from the ids as it gathers its rows (decode, see
    # moeflow.ops.decode_route_fused_triton.route_decode_fused's place_rows).
    placed: bool = True


@dataclass(frozen=True)
class RoutingResult:
    ids_TK: torch.Tensor  # int64 expert ids in [0, E)
    weights_TK: torch.Tensor  # fp32 combine weights, 0 where dropped
    kept_TK: torch.Tensor  # bool, False where the assignment was dropped
    slots_TK: torch.Tensor  # int64 position of the assignment inside its expert's queue
    counts_E: torch.Tensor  # int64 assignments per expert after dropping
    num_dropped: torch.Tensor  # int64 scalar
    capacity: int | None  # slots per expert, None when dropless
    aux_loss: torch.Tensor  # unweighted load-balancing loss
    z_loss: torch.Tensor  # unweighted router z-loss
    loss: torch.Tensor  # aux_loss_coef * aux_loss + z_loss_coef * z_loss
    # The layout LocalDispatcher would sort, already computed (None: the dispatcher sorts).
    order: ExpertOrder | None = None

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]


HALF_DTYPES = (torch.bfloat16, torch.float16)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)


def router_logits(x_TD: torch.Tensor, w_ED: torch.Tensor, finite: bool = True) -> torch.Tensor:
    """fp32 logits x·Wgᵀ, made finite (NaN → -max, ±inf → ±max) unless `finite` is False (the
    Triton routers finite-ize the logits they load themselves, and their backward gives a
    non-finite logit no gradient, as nan_to_num's does), under autocast too: autocast would run the product in bf16
    even from fp32 operands, and bf16-rounded logits change which experts win (ties, near-ties)
    and keep the fp32 Triton router from being chosen.

    Plain torch, not a compiled twin (moeflow.ops.fused): inductor gave the same four kernels
    (two casts, the GEMM, nan_to_num), so a CUDA graph gained nothing, while each eager call paid
    the twin's guards and wrappers: ~0.4 of the 1.8 ms host time of a T = 8 layer call on the
    H200 host (benchmarks/results/host_ops/host_profile_qwen3_T8_H200_2026-12-02.log), and
    shape changes recompiled it.

    bf16/fp16 operands on CUDA without autograd (serving): one half-precision GEMM with fp32
    accumulation and output (aten::mm.dtype) gives the fp32 logits to summation order, since
    the product of two bf16 numbers is exact in fp32; the fp32 GEMM of their upcast copies
    took 1.48 of the 40 ms prefill of 2048 tokens on the Qwen3-30B-A3B shape (H200,
    benchmarks/results/prefill), with two cast kernels besides. CPU torch has no mm.dtype."""
    device = x_TD.device.type
    if (x_TD.is_cuda and x_TD.dtype in HALF_DTYPES and w_ED.dtype == x_TD.dtype
            and not records_grad(x_TD, w_ED)):
        flat_ND = x_TD.reshape(-1, x_TD.shape[-1])
        logits_NE = torch.mm(flat_ND, w_ED.t(), out_dtype=torch.float32)
        logits_TE = logits_NE.view(*x_TD.shape[:-1], w_ED.shape[0])
    elif not (is_autocast_available(device) and torch.is_autocast_enabled(device)):
        logits_TE = F.linear(x_TD.float(), w_ED.float())
    else:
        with torch.autocast(device, enabled=False):
            logits_TE = F.linear(x_TD.float(), w_ED.float())
    return _finite(logits_TE) if finite else logits_TE


def _stable_topk(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row; ties go to the lower index."""
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def count_ids(ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None
           ) -> torch.Tensor:
    """Per-expert counts of `ids` (optionally weighted), without bincount's host sync, so the
    router can be captured in a CUDA graph."""
    ones = torch.ones_like(ids) if weights is None else weights.to(ids.dtype)
    return torch.zeros(num_experts, dtype=ids.dtype, device=ids.device).scatter_add_(0, ids, ones)


def _limit_groups(sel_TE: torch.Tensor, num_groups: int, topk_groups: int,
                  group_score: str = "top2_sum") -> torch.Tensor:
    """Mask out all experts outside each token's `topk_groups` best groups (DeepSeek-V2/V3).

    A group's score is the sum of its two best experts' scores (V3) or its best score (V2)."""
    T, E = sel_TE.shape
    grouped = sel_TE.view(T, num_groups, E // num_groups)
    if group_score == "max":
        best = grouped.max(dim=-1).values  # [T, groups]
    else:
        best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    keep_groups = _stable_topk(best, topk_groups)
    mask = torch.zeros(T, num_groups, dtype=torch.bool, device=sel_TE.device)
    mask.scatter_(1, keep_groups, True)
    return torch.where(mask[:, :, None], grouped, float("-inf")).view(T, E)


def selects_by_logits(cfg: RouterConfig, has_bias: bool) -> bool:
    """DeepSpeed's rule applies: first choice by probability, later ones by logits."""
    return cfg.score_func == "softmax" and not has_bias and cfg.num_groups == 1


def select_experts(logits_TE: torch.Tensor, scores_TE: torch.Tensor, cfg: RouterConfig,
                   expert_bias_E: torch.Tensor | None, noise_TE: torch.Tensor | None,
                   allowed_TE: torch.Tensor | None = None) -> torch.Tensor:
    """ids_TK: each token's k experts in choice order (RouterConfig's docstring has the rule).
    noise_TE is Gumbel noise: on every choice's logits for "rsample", on the 2nd..k-th choice's
    for "rsample_second". allowed_TE (expert groups) restricts the choice: the caller has set
    the logits of the other experts to -inf, and the selection scores (which a bias or a
    sigmoid that underflows to 0 could tie with theirs) are masked here."""
    if cfg.noise == "rsample" and noise_TE is not None:
        return _stable_topk(logits_TE + noise_TE, cfg.top_k)
    if selects_by_logits(cfg, expert_bias_E is not None):
        first_T = scores_TE.argmax(dim=-1)  # the first maximum: ties go to the lower index
        if cfg.top_k == 1:
            return first_T.unsqueeze(1)
        ids = [first_T]
        rest_TE = logits_TE if noise_TE is None else logits_TE + noise_TE
        # Taken experts are set to -inf one choice at a time (a scatter, not a one-hot mask:
        # F.one_hot validates its input with a min/max, a host sync on CPU, and costs 4 ops).
        for _ in range(cfg.top_k - 1):
            rest_TE = rest_TE.scatter(1, ids[-1].unsqueeze(1), float("-inf"))
            ids.append(rest_TE.argmax(dim=-1))
        return torch.stack(ids, dim=1)
    sel_TE = scores_TE
    if expert_bias_E is not None:
        sel_TE = sel_TE + expert_bias_E
    if allowed_TE is not None:
        sel_TE = sel_TE.masked_fill(~allowed_TE, float("-inf"))
    if cfg.num_groups > 1:
        sel_TE = _limit_groups(sel_TE, cfg.num_groups, cfg.topk_groups, cfg.group_score)
    return _stable_topk(sel_TE, cfg.top_k)


def queue_slots(ids_TK: torch.Tensor, num_experts: int, token_order_T: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(slots_TK, counts_E): each assignment's position in its expert's queue, in priority order
    (choice-major), and the assignments per expert (before any dropping)."""
    T, K = ids_TK.shape
    ids_KT = ids_TK.t()
    if token_order_T is not None:
        ids_KT = ids_KT[:, token_order_T]
    flat = ids_KT.reshape(-1)
    sorted_ids, order = torch.sort(flat, stable=True)
    counts = count_ids(flat, num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[sorted_ids]
    slots_flat = torch.empty_like(rank).index_put_((order,), rank)
    slots_KT = slots_flat.view(K, T)
    if token_order_T is not None:
        slots_KT = torch.empty_like(slots_KT).index_copy_(1, token_order_T, slots_KT)
    return slots_KT.t(), counts


def balance_ids(ids_TK: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """The assignments whose shares make f_e in the balance loss."""
    return ids_TK[:, :1] if cfg.balance_on_first_choice else ids_TK


def balance_probs(scores_TE: torch.Tensor, cfg: RouterConfig) -> torch.Tensor:
    """P's per-token distribution: softmax scores, or sigmoid scores normalised per token."""
    if cfg.score_func == "softmax":
        return scores_TE
    return scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)


def aux_loss_from(probs_TE: torch.Tensor, counts_E: torch.Tensor, total: int | None = None
                  ) -> torch.Tensor:
    """E · Σ_e f_e · P_e with f_e = counts_E / Σ counts and P_e the mean of probs over tokens.
    `total`: Σ counts when the caller knows it on the host (the same division, two ops fewer)."""
    T, E = probs_TE.shape
    total = counts_E.sum().clamp_min(1) if total is None else max(total, 1)
    frac_E = counts_E.float() / total
    return E * (frac_E * probs_TE.sum(0) / max(T, 1)).sum()


def weighted_loss(cfg: RouterConfig, aux_loss: torch.Tensor, z_loss: torch.Tensor
                  ) -> torch.Tensor:
    """aux_coef·aux + z_coef·z, leaving out terms whose coefficient is 0 (they may be inf)."""
    # Terms are added onto the first one rather than onto a zero: the same values (the terms
    # are >= 0, so 0 + x == x bit for bit) with two ops fewer per layer.
    terms = [coef * t for coef, t in ((cfg.aux_loss_coef, aux_loss), (cfg.z_loss_coef, z_loss))
             if coef]
    if not terms:
        return aux_loss.new_zeros(())
    loss = terms[0]
    for t in terms[1:]:
        loss = loss + t
    return loss


def route_reference(logits_TE: torch.Tensor, cfg: RouterConfig, capacity: int | None,
                    expert_bias_E: torch.Tensor | None, noise_TE: torch.Tensor | None,
                    order_T: torch.Tensor | None, stats_reduce: StatsReduce | None = None,
                    groups: GroupRouting | None = None) -> RoutingResult:
    """Plain-torch routing from finite fp32 logits. noise_TE is Gumbel noise (see
    select_experts); order_T is the RTS token order; stats_reduce sums the balance counts over
    data-parallel ranks (see the module docstring); `groups` routes every token inside its
    expert group (moeflow.model.expert_groups), with per-group capacities replacing
    `capacity`."""
    T, E = logits_TE.shape
    allowed_TE = None
    if groups is not None:
        allowed_TE = groups.allowed_TE
        logits_TE = logits_TE.masked_fill(~allowed_TE, float("-inf"))
        capacity = groups.capacity
    scores_TE = logits_TE.softmax(dim=-1) if cfg.score_func == "softmax" else logits_TE.sigmoid()
    ids_TK = select_experts(logits_TE, scores_TE, cfg, expert_bias_E, noise_TE, allowed_TE)

    slots_TK, queued_E = queue_slots(ids_TK, E, order_T)
    # Expert e keeps its first `capacity` assignments, so its kept count is min(queued, capacity)
    # and the counts need no second scatter; dropless, nothing is masked or counted again.
    if capacity is None:
        kept_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        counts_E = queued_E
        num_dropped = queued_E.new_zeros(())
    else:
        cap = groups.capacity_E if groups is not None else capacity
        kept_TK = slots_TK < (cap[ids_TK] if groups is not None else cap)
        counts_E = (torch.minimum(queued_E, cap) if groups is not None
                    else queued_E.clamp_max(cap))
        num_dropped = T * ids_TK.shape[1] - counts_E.sum()
    weights_TK = scores_TE.gather(1, ids_TK)
    if capacity is not None:
        weights_TK = weights_TK * kept_TK
    if cfg.normalizes:
        weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(NORM_EPS)
    if cfg.routed_scaling != 1.0:
        weights_TK = weights_TK * cfg.routed_scaling

    # f_e's counts: the queue's (all choices) unless the balance loss counts first choices only.
    first_only = cfg.balance_on_first_choice and ids_TK.shape[1] > 1
    balance_E = count_ids(balance_ids(ids_TK, cfg).reshape(-1), E) if first_only else queued_E
    total = None
    if stats_reduce is not None:
        balance_E = stats_reduce(balance_E)
    else:
        total = T * (1 if first_only else ids_TK.shape[1])
    if groups is None:
        aux_loss = aux_loss_from(balance_probs(scores_TE, cfg), balance_E, total)
    else:
        aux_loss = grouped_aux_loss(balance_probs(scores_TE, cfg), balance_E, groups.sizes)
    z_loss = torch.logsumexp(logits_TE, dim=-1).pow(2).sum() / max(T, 1)
    aux_loss, z_loss = detach_unused(cfg, aux_loss, z_loss)
    return RoutingResult(ids_TK=ids_TK, weights_TK=weights_TK, kept_TK=kept_TK, slots_TK=slots_TK,
                         counts_E=counts_E, num_dropped=num_dropped, capacity=capacity,
                         aux_loss=aux_loss, z_loss=z_loss,
                         loss=weighted_loss(cfg, aux_loss, z_loss))


def detach_unused(cfg: RouterConfig, aux_loss: torch.Tensor, z_loss: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """A loss with coefficient 0 is a statistic: detached, so an inf value cannot send 0·inf
    into the gradient of callers that sum the statistics."""
    return (aux_loss if cfg.aux_loss_coef else aux_loss.detach(),
            z_loss if cfg.z_loss_coef else z_loss.detach())


class Router(nn.Module, ChoosesBackends):
    def __init__(self, d_model: int, num_experts: int, config: RouterConfig,
                 backends: Backends = Backends(), stats_reduce: StatsReduce | None = None
                 ) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.backends = backends  # router: routing kernels; fuse: the logits prologue
        # Balance counts summed over data-parallel ranks (None: this process's batch only).
        self.stats_reduce = stats_reduce
        # The fused decode kernel's ticket counters, made on its first launch on a device.
        self._route_tickets = DeviceCounters()
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x_TD: torch.Tensor | None, generator: torch.Generator | None = None,
                inference: bool = False, groups: TokenGroups | None = None,
                logits_TE: torch.Tensor | None = None,
                experts_place: bool = False,
                norm_input: PendingAddNorm | None = None) -> RoutingResult:
        """Route x_TD. `inference=True` routes as served: no capacity and no noise, whatever
        the training flag says, so a token's experts depend on nothing but the token.
        `groups`: each token's expert group, for a router with expert_groups (None: every token
        in group 0). `logits_TE`: route by these logits instead of the gate's (a model with a
        lookahead router, moeflow.model.lookahead); x_TD is then unused and may be None, and
        input jitter, which perturbs the gate's input, does not apply. `experts_place`: the
        caller's experts can place the rows (moeflow.model.moe): the one-launch decode kernel
        may then stop after the counts and ends (order.placed False) for at most
        EXPERTS_PLACE_MAX_TOKENS tokens, dropless. `norm_input`: x_TD is norm_input.y, not yet
        written (moeflow.ops.norm_triton.PendingAddNorm): the one-launch decode kernel computes
        it with the logits, any other path runs it first."""
        cfg, E = self.config, self.num_experts
        x = x_TD if logits_TE is None else logits_TE
        T = x.shape[0]
        noise = cfg.noise if self.training and not inference else "none"
        capacity = None if inference else cfg.capacity(T, E, self.training)
        sources = (x,) if logits_TE is not None else (x, self.gate.weight)
        grad = records_grad(*sources)
        bound = one_launch_bound(cfg, capacity, noise, self.stats_reduce is not None, grad)
        fused = (logits_TE is None and noise != "jitter"  # the logits' launch has no backward
                 and router_fuses_logits(self.backends.router, x, cfg, E, 0 if grad else bound))
        if norm_input is not None and not fused:
            norm_input.run()  # x_TD is its output: written before anything reads it
        # Raw logits: only the reference router needs them made finite (a launch the Triton
        # routers do not need; 48 of them per prefill of the Qwen3-30B-A3B shape).
        if logits_TE is not None:
            logits_TE = logits_TE.float()
        else:
            if noise == "jitter":
                u = torch.rand(x.shape, device=x.device, generator=generator)
                x = x.float() * (1 - cfg.noise_eps + 2 * cfg.noise_eps * u)
            if fused:
                place = not (experts_place and capacity is None
                             and T <= EXPERTS_PLACE_MAX_TOKENS)
                return self._route_fused(x, capacity, place, norm_input)
            logits_TE = router_logits(x, self.gate.weight, finite=False)
        gumbel_TE = None
        if noise in ("rsample", "rsample_second"):
            u = torch.rand(logits_TE.shape, device=x.device, generator=generator)
            gumbel_TE = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
        token_order = None
        if capacity is not None and cfg.drop_policy == "random":
            token_order = torch.randperm(T, device=x.device, generator=generator)
        if cfg.expert_groups:  # the fused kernels do not mask groups: resolve_router_backend
            if groups is None:
                ids_T = torch.zeros(T, dtype=torch.int64, device=x.device)
                groups = TokenGroups(ids_T, (T,) + (0,) * (len(cfg.expert_groups) - 1))
            grouped = group_routing(cfg, groups, capacity is not None, self.training)
            resolve_router_backend(self.backends.router, logits_TE, cfg)  # refuses "triton"
            return route_reference(_finite(logits_TE), cfg, capacity, self.expert_bias, gumbel_TE,
                                   token_order, self.stats_reduce, grouped)
        backend = resolve_router_backend(self.backends.router, logits_TE, cfg, bound)
        if backend in ("triton_decode", "triton_decode_fused"):
            from moeflow.ops.decode_route_triton import route_decode_triton
            return route_decode_triton(logits_TE, cfg, self.expert_bias, capacity)
        if backend == "triton":
            from moeflow.ops.routing_triton import route_triton
            return route_triton(logits_TE, cfg, capacity, self.expert_bias, gumbel_TE,
                                token_order, self.stats_reduce)
        return route_reference(_finite(logits_TE), cfg, capacity, self.expert_bias, gumbel_TE,
                               token_order, self.stats_reduce)

    def _route_fused(self, x_TD: torch.Tensor, capacity: int | None, place_rows: bool,
                     norm_input: PendingAddNorm | None) -> RoutingResult:
        """Logits and decode routing in one launch (moeflow.ops.decode_route_fused_triton),
        the norm of x_TD too when it is pending."""
        from moeflow.ops.decode_route_fused_triton import ROUTE_TICKETS, route_decode_fused
        tickets = self._route_tickets.get(ROUTE_TICKETS, x_TD.device)
        rows = x_TD if norm_input is None else norm_input
        return route_decode_fused(rows, self.gate.weight, self.config, self.expert_bias,
                                  tickets, capacity, place_rows)[0]

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: nudge under-loaded experts up, over-loaded ones down."""
        if self.expert_bias is None:
            return
        load = counts_E.float().to(self.expert_bias.device)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
