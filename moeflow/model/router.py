"""Token → expert routing with DeepSpeed-MoE semantics, returning one frozen `RoutingResult`.

Steps (all in fp32): logits = x·Wg → (NaN/inf made finite) → scores (softmax or sigmoid) →
selection scores (+ Gumbel noise for RSample, + aux-free expert bias, group limiting) → top-k by a
stable sort, so ties go to the lower expert index → weights gathered from the *unbiased* scores,
optionally renormalised and scaled → capacity: each expert keeps its first `capacity` assignments
in priority order and drops the rest.

Priority order: all first choices before any second choice (GShard/DeepSpeed top-2), and within
one choice rank, tokens in position order ("position") or in a random order drawn from the torch
RNG ("random", Random Token Selection) — seed the RNG or pass a generator to reproduce it.

Losses are returned unweighted and weighted: aux = E · Σ_e f_e · P_e (Switch/GShard), with f_e the
fraction of assignments (before dropping) to e and P_e its mean score; z = mean(logsumexp(logits)²).
Under data parallelism `stats_reduce` (set by moeflow.parallel) sums the assignment counts over the
data-parallel ranks, so f_e is the global batch's fraction and the averaged loss does not depend on
how the batch was split.

Legend: T tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moeflow.config import RouterConfig


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

    @property
    def num_experts(self) -> int:
        return self.counts_E.shape[0]


def _finite(logits: torch.Tensor) -> torch.Tensor:
    big = torch.finfo(logits.dtype).max
    return torch.nan_to_num(logits, nan=-big, posinf=big, neginf=-big)


def _stable_topk(scores_TE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores per row; ties go to the lower index."""
    return torch.sort(scores_TE, dim=-1, descending=True, stable=True).indices[:, :k]


def _limit_groups(sel_TE: torch.Tensor, num_groups: int, topk_groups: int) -> torch.Tensor:
    """Mask out all experts outside each token's `topk_groups` best groups (DeepSeek-V3)."""
    T, E = sel_TE.shape
    grouped = sel_TE.view(T, num_groups, E // num_groups)
    best = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)  # [T, groups]
    keep_groups = _stable_topk(best, topk_groups)
    mask = torch.zeros(T, num_groups, dtype=torch.bool, device=sel_TE.device)
    mask.scatter_(1, keep_groups, True)
    return torch.where(mask[:, :, None], grouped, float("-inf")).view(T, E)


def queue_slots(ids_TK: torch.Tensor, num_experts: int, token_order_T: torch.Tensor | None
                ) -> torch.Tensor:
    """Each assignment's position in its expert's queue, in priority order (choice-major)."""
    T, K = ids_TK.shape
    ids_KT = ids_TK.t()
    if token_order_T is not None:
        ids_KT = ids_KT[:, token_order_T]
    flat = ids_KT.reshape(-1)
    order = torch.sort(flat, stable=True).indices
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(flat.numel(), device=flat.device) - starts[flat[order]]
    slots_flat = torch.empty_like(rank)
    slots_flat[order] = rank
    slots_KT = slots_flat.view(K, T)
    if token_order_T is not None:
        slots_KT = torch.empty_like(slots_KT).index_copy_(1, token_order_T, slots_KT)
    return slots_KT.t()


class Router(nn.Module):
    def __init__(self, d_model: int, num_experts: int, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        self.num_experts = num_experts
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        # Inference turns capacity off so a token's output never depends on its batch-mates.
        self.force_dropless = False
        # counts_E -> counts summed over data-parallel ranks (None: this process's batch only).
        self.stats_reduce = None
        if config.expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None

    def forward(self, x_TD: torch.Tensor, generator: torch.Generator | None = None) -> RoutingResult:
        cfg, E = self.config, self.num_experts
        T = x_TD.shape[0]
        x = x_TD.float()
        noisy = self.training and cfg.noise != "none"
        if noisy and cfg.noise == "jitter":
            u = torch.rand(x.shape, device=x.device, generator=generator)
            x = x * (1 - cfg.noise_eps + 2 * cfg.noise_eps * u)
        logits_TE = _finite(F.linear(x, self.gate.weight.float()))

        if cfg.score_func == "softmax":
            scores_TE = logits_TE.softmax(dim=-1)
        else:
            scores_TE = logits_TE.sigmoid()
        sel_TE = scores_TE
        if noisy and cfg.noise == "rsample":
            u = torch.rand(logits_TE.shape, device=x.device, generator=generator)
            gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
            sel_TE = logits_TE + gumbel
        if self.expert_bias is not None:
            sel_TE = sel_TE + self.expert_bias
        if cfg.num_groups > 1:
            sel_TE = _limit_groups(sel_TE, cfg.num_groups, cfg.topk_groups)
        ids_TK = _stable_topk(sel_TE, cfg.top_k)

        weights_TK = scores_TE.gather(1, ids_TK)
        if cfg.normalize_topk:
            weights_TK = weights_TK / weights_TK.sum(-1, keepdim=True).clamp_min(1e-20)
        weights_TK = weights_TK * cfg.routed_scaling

        capacity = None if self.force_dropless else cfg.capacity(T, E, self.training)
        token_order = None
        if capacity is not None and cfg.drop_policy == "random":
            token_order = torch.randperm(T, device=x.device, generator=generator)
        slots_TK = queue_slots(ids_TK, E, token_order)
        if capacity is None:
            kept_TK = torch.ones_like(ids_TK, dtype=torch.bool)
        else:
            kept_TK = slots_TK < capacity
        weights_TK = weights_TK * kept_TK

        flat_ids = ids_TK.reshape(-1)
        counts_before = torch.bincount(flat_ids, minlength=E)
        counts_E = torch.zeros(E, dtype=torch.int64, device=x.device)
        counts_E.scatter_add_(0, flat_ids, kept_TK.reshape(-1).long())

        probs_TE = scores_TE if cfg.score_func == "softmax" else \
            scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(1e-20)
        if self.stats_reduce is not None:
            counts_before = self.stats_reduce(counts_before)
        frac_E = counts_before.float() / counts_before.sum().clamp_min(1)
        aux_loss = E * (frac_E * probs_TE.sum(0) / max(T, 1)).sum()
        z_loss = torch.logsumexp(logits_TE, dim=-1).pow(2).sum() / max(T, 1)
        return RoutingResult(
            ids_TK=ids_TK, weights_TK=weights_TK, kept_TK=kept_TK, slots_TK=slots_TK,
            counts_E=counts_E, num_dropped=(~kept_TK).sum(), capacity=capacity,
            aux_loss=aux_loss, z_loss=z_loss,
            loss=cfg.aux_loss_coef * aux_loss + cfg.z_loss_coef * z_loss,
        )

    @torch.no_grad()
    def update_expert_bias(self, counts_E: torch.Tensor) -> None:
        """Aux-loss-free balancing: nudge under-loaded experts up, over-loaded ones down."""
        if self.expert_bias is None:
            return
        load = counts_E.float().to(self.expert_bias.device)
        self.expert_bias += self.config.bias_update_rate * torch.sign(load.mean() - load)
