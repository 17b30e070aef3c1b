"""Per-group load statistics of a model with expert groups, for metrics rows and summaries.

Every assignment of a token lands on an expert of the token's group (moeflow.model.
expert_groups), so a group's traffic is read off per-expert counts: its assignments are the
kept and dropped assignments of its experts, its dropped fraction the dropped ones' share.
Training rows carry, summed over MoE layers like `dropped_frac`:
  group_assignments  {group: token→expert assignments routed inside the group}
  group_dropped_frac {group: share of them dropped by the group's capacity}
Validation rows already carry expert_load and expert_groups; `group_load_summary` turns those
into each group's share of the traffic and its balance (the busiest expert's load relative to
the group's mean: 1 is perfectly balanced inside the group).
"""

from __future__ import annotations

import torch

from moeflow.config import RouterConfig
from moeflow.model.expert_groups import group_slices
from moeflow.model.router import count_ids
from moeflow.model.transformer import LayerRouting


def dropped_per_expert(routing: LayerRouting) -> torch.Tensor:
    """int64 [E]: assignments to each expert that capacity dropped (no host sync)."""
    return count_ids(routing.ids_TK.reshape(-1), routing.counts_E.shape[0],
                     weights=~routing.kept_TK.reshape(-1))


def group_step_stats(router: RouterConfig, counts: list[torch.Tensor],
                     dropped: list[torch.Tensor]) -> dict:
    """The metrics row's group_assignments and group_dropped_frac (one host sync)."""
    kept_G = torch.zeros(len(router.expert_groups), dtype=torch.float64)
    drop_G = torch.zeros_like(kept_G)
    pairs = [(c.to("cpu", torch.float64), d.to("cpu", torch.float64))
             for c, d in zip(counts, dropped)]
    for kept_E, drop_E in pairs:
        for g, (start, end) in enumerate(group_slices(router.group_sizes)):
            kept_G[g] += kept_E[start:end].sum()
            drop_G[g] += drop_E[start:end].sum()
    total_G = kept_G + drop_G
    frac_G = drop_G / total_G.clamp_min(1)
    names = router.group_names
    return {"group_assignments": dict(zip(names, map(int, total_G.tolist()))),
            "group_dropped_frac": dict(zip(names, frac_G.tolist()))}


def group_load_summary(row: dict) -> dict[str, dict[str, float]]:
    """{group: {"share": its share of all assignments, "max_load": busiest expert / group
    mean, averaged over MoE layers}} from a validation row with expert_load and expert_groups."""
    out = {}
    loads = [torch.tensor(x, dtype=torch.float64) for x in row["expert_load"]]
    total = sum(float(x.sum()) for x in loads)
    sizes = tuple(n for _, n in row["expert_groups"])
    for (name, _), (start, end) in zip(row["expert_groups"], group_slices(sizes)):
        mine = [x[start:end] for x in loads]
        ratios = [float(x.max() / x.mean()) for x in mine if float(x.sum()) > 0]
        out[name] = {"share": sum(float(x.sum()) for x in mine) / max(total, 1.0),
                     "max_load": sum(ratios) / len(ratios) if ratios else float("nan")}
    return out
