"""Expert groups (MoMa's modality-aware experts, JiuZhang 2.0's task-specific experts).

A layer's E experts are split into named groups of contiguous global ids (RouterConfig's
`expert_groups`, e.g. (("code", 4), ("text", 4)): experts 0-3 and 4-7). Every token carries a
group id, given to the model as `model(ids, groups=groups_BT)`; without one a token is in group
0. The router routes each token only inside its group:

* selection: the logits of the other groups' experts are set to -inf before scores and top-k,
  so the softmax, the top-k and the z-loss are those of a router over the group's experts alone
  (the masked experts get weight 0 and no gradient through the token);
* capacity: group g's experts hold cfg.capacity(T_g, E_g) slots each, T_g being the batch's
  tokens of group g and E_g the group's experts (a group's tokens fill only its experts' queues,
  so the queue positions need no change); RoutingResult.capacity is the largest group's, an
  upper bound on every expert's slots (what the fixed-capacity all-to-all sizes its buffers by);
* balance loss: aux = Σ_g E_g · Σ_{e∈g} f_e^g · P_e, with f_e^g the share of group g's counted
  assignments that went to e and P_e = Σ_t p_te / T over all T tokens (p_te is 0 outside the
  token's group). That is Σ_g (T_g/T) · aux_g with aux_g the Switch loss of group g's tokens over
  group g's experts: the token-weighted mean of the per-group losses, 1 at perfect balance, as
  the ungrouped loss. It is linear in the per-token terms, so with the balance counts summed over
  data-parallel ranks (the router's stats_reduce) the rank-averaged loss is the whole batch's.

Dispatch, experts and combine see global expert ids and are unchanged, so expert parallelism
places a group's experts on whichever ranks hold those ids. Shared experts stay shared by all
groups. With one group every step above is the ungrouped router's, operation for operation.

Legend: T tokens, E experts, G expert groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeflow.config import RouterConfig


@dataclass(frozen=True)
class TokenGroups:
    """The group id of every token of one forward pass and each group's token count (read on
    the host once per forward: capacity is a Python int per group)."""

    ids_T: torch.Tensor  # int64 group id per token, in [0, G)
    counts: tuple[int, ...]  # tokens per group


@dataclass(frozen=True)
class GroupRouting:
    """What one layer's router needs to route inside groups (built by `group_routing`)."""

    allowed_TE: torch.Tensor  # bool, True where expert e is in token t's group
    capacity_E: torch.Tensor | None  # int64 slots of each expert (its group's), None: dropless
    capacity: int | None  # the largest group's slots: an upper bound for buffers
    sizes: tuple[int, ...]  # experts per group


def group_routing(cfg: RouterConfig, groups: TokenGroups, capacity_on: bool, training: bool
                  ) -> GroupRouting:
    """The mask and capacities for routing `groups`' tokens (capacity_on=False: dropless)."""
    sizes = cfg.group_sizes
    device = groups.ids_T.device
    caps = group_capacities(cfg, groups, training) if capacity_on else None
    capacity_E = None if caps is None else capacity_per_expert(caps, sizes, device)
    return GroupRouting(allowed_experts(groups, sizes), capacity_E,
                        None if caps is None else max(caps), sizes)


def token_groups(groups: torch.Tensor, num_tokens: int, num_groups: int) -> TokenGroups:
    """Check a `groups` argument (any shape with `num_tokens` elements, ids in [0, G)) and count
    its tokens per group: one host sync."""
    if groups.numel() != num_tokens:
        raise ValueError(f"groups has {groups.numel()} entries for {num_tokens} tokens; give "
                         f"one group id per token (the shape of input_ids)")
    if groups.dtype.is_floating_point or groups.dtype == torch.bool:
        raise ValueError(f"groups must hold integer group ids, got {groups.dtype}")
    ids_T = groups.reshape(-1).long()
    counts_G = torch.bincount(ids_T.clamp(0, num_groups), minlength=num_groups + 1)
    low = (ids_T < 0).sum()
    stats = torch.cat([counts_G, low[None]]).tolist()
    if stats[num_groups] or stats[-1]:
        raise ValueError(f"groups: group ids must be in [0, {num_groups}) (the model has "
                         f"{num_groups} expert groups)")
    return TokenGroups(ids_T, tuple(stats[:num_groups]))


def expert_group_ids(sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """group_E: the group of every global expert id."""
    return torch.repeat_interleave(torch.arange(len(sizes), device=device),
                                   torch.tensor(sizes, device=device))


def allowed_experts(groups: TokenGroups, sizes: tuple[int, ...]) -> torch.Tensor:
    """allowed_TE: True where expert e is in token t's group."""
    group_E = expert_group_ids(sizes, groups.ids_T.device)
    return groups.ids_T[:, None] == group_E[None, :]


def group_capacities(cfg: RouterConfig, groups: TokenGroups, training: bool
                     ) -> tuple[int, ...] | None:
    """Slots per expert of each group (cfg.capacity of the group's tokens over its experts), or
    None when routing is dropless."""
    caps = [cfg.capacity(t, e, training) for t, e in zip(groups.counts, cfg.group_sizes)]
    return None if caps[0] is None else tuple(caps)


def capacity_per_expert(caps: tuple[int, ...], sizes: tuple[int, ...], device: torch.device
                        ) -> torch.Tensor:
    """capacity_E: each expert's slots (its group's capacity)."""
    return torch.repeat_interleave(torch.tensor(caps, device=device),
                                   torch.tensor(sizes, device=device))


def grouped_aux_loss(probs_TE: torch.Tensor, counts_E: torch.Tensor, sizes: tuple[int, ...]
                     ) -> torch.Tensor:
    """Σ_g E_g · Σ_{e∈g} f_e^g · P_e (module docstring); with one group exactly
    moeflow.model.router.aux_loss_from."""
    T = probs_TE.shape[0]
    mass_E = probs_TE.sum(0)
    terms = []
    for start, end in group_slices(sizes):
        frac = counts_E[start:end].float() / counts_E[start:end].sum().clamp_min(1)
        terms.append((end - start) * (frac * mass_E[start:end] / max(T, 1)).sum())
    return torch.stack(terms).sum()


def group_slices(sizes: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, end) of each group's global expert ids."""
    out, start = [], 0
    for size in sizes:
        out.append((start, start + size))
        start += size
    return out
