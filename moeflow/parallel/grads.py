"""Gradient reduction, clipping and optimizer-state sharding for a sharded model.

Scaling. Each rank's loss is the mean over its own tokens and the global loss is the mean of the
per-rank losses (global batches split evenly), so the global gradient is (1/W)·Σ_r ∂loss_r/∂θ.
* Dense parameters exist on all W ranks: all-reduce-sum over the world, divide by W.
* An expert (slice) held at position j of a layer with EP size p has W/p copies, one per replica.
  The all-to-all backward already summed, on each copy, the gradients from the p ranks whose
  tokens it served; all-reducing over its expert-data-parallel group (the W/p copies) completes
  the sum over all W ranks, so expert gradients are divided by W too, not by W/p.
A parameter that got no gradient this step (e.g. experts on a rank that received no tokens) joins
the reduction with zeros, so every rank issues the same collectives and nothing hangs.

Optimizer state. `ShardedOptimizer` builds one optimizer per replication group (the world for
dense parameters, each expert-data-parallel group for experts) and, with zero=True, wraps each in
torch's ZeroRedundancyOptimizer over that group: every rank keeps the Adam moments of 1/n of the
parameters it shares with n-1 others and broadcasts its updated part (ZeRO-1; gradients are
all-reduced whole, not reduce-scattered). FSDP2 (`fully_shard`) would also shard gradients and
parameters, but it needs reduce-scatter, which gloo does not provide on CPU (see the README), and
it would re-gather expert weights that expert parallelism already shards, so it is not used here.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from moeflow.model.experts import Experts
from moeflow.parallel.mesh import ProcessGroups


def replication_groups(model: nn.Module, groups: ProcessGroups
                       ) -> list[tuple[object, list[nn.Parameter], int | None]]:
    """[(process group, parameters replicated over it, EP size or None for dense)], fixed order."""
    expert_params: dict[int, list[nn.Parameter]] = defaultdict(list)
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, Experts) and module.layout is not None:
            for p in module.parameters():
                expert_params[module.layout.ep_size].append(p)
                seen.add(id(p))
    dense = [p for p in model.parameters() if id(p) not in seen]
    out = [(groups.world_group, dense, None)]
    for size in sorted(expert_params):
        out.append((groups.by_size(size).expert_dp, expert_params[size], size))
    return out


def _grad_or_zeros(p: nn.Parameter) -> torch.Tensor:
    if p.grad is None:
        p.grad = torch.zeros_like(p)
    return p.grad


@torch.no_grad()
def reduce_gradients(model: nn.Module, groups: ProcessGroups, dense: bool = True) -> None:
    """Average gradients over the global batch (see module docstring for the scaling).
    dense=False: expert gradients only (the dense ones were reduced during backward by
    moeflow.parallel.overlap)."""
    world = groups.layout.world
    for group, params, ep_size in replication_groups(model, groups):
        if ep_size is None and not dense:
            continue
        params = [p for p in params if p.requires_grad]
        if not params:
            continue
        grads = [_grad_or_zeros(p) for p in params]
        if dist.get_world_size(group) == 1:  # experts held once (EP = world): scale in place
            torch._foreach_div_(grads, world)
            continue
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)


@torch.no_grad()
def grad_norm(model: nn.Module, groups: ProcessGroups) -> torch.Tensor:
    """Global L2 norm of the reduced gradients, counting every expert (slice) exactly once."""
    total = None
    for _, params, ep_size in replication_groups(model, groups):
        if not params:
            continue
        sq = torch.zeros((), device=params[0].device)
        for p in params:
            if p.grad is not None:
                sq = sq + p.grad.float().pow(2).sum()
        if ep_size is not None:
            # The ranks of one EP group hold disjoint experts (slices): sum their squares.
            ep_group = groups.by_size(ep_size).ep
            if dist.get_world_size(ep_group) > 1:
                dist.all_reduce(sq, group=ep_group)
        total = sq if total is None else total + sq
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, groups: ProcessGroups, max_norm: float) -> torch.Tensor:
    """Scale reduced gradients so their global norm is at most max_norm; returns the norm."""
    norm = grad_norm(model, groups)
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for p in model.parameters():
        if p.grad is not None:
            p.grad.mul_(scale.to(p.grad.device))
    return norm


class ShardedOptimizer:
    """One optimizer per replication group, optionally ZeRO-sharded over that group.

    param_groups: parameters or dicts as for torch optimizers (e.g. weight-decay groups); each is
    split by replication group. Call reduce_gradients (and clip) before step().
    """

    def __init__(self, model: nn.Module, groups: ProcessGroups, optimizer_class,
                 param_groups=None, zero: bool = False, **defaults) -> None:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if param_groups is None:
            param_groups = [{"params": list(model.parameters())}]
        param_groups = [g if isinstance(g, dict) else {"params": [g]} for g in param_groups]
        self.optimizers = []
        for group, params, _ in replication_groups(model, groups):
            ids = {id(p) for p in params}
            mine = []
            for g in param_groups:
                kept = [p for p in g["params"] if id(p) in ids and p.requires_grad]
                if kept:
                    mine.append({**g, "params": kept})
            if not mine:
                continue
            if zero and dist.get_world_size(group) > 1:
                opt = ZeroRedundancyOptimizer(mine, optimizer_class, process_group=group,
                                              **defaults)
            else:
                opt = optimizer_class(mine, **defaults)
            self.optimizers.append(opt)

    @property
    def param_groups(self) -> list[dict]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers over this rank's parameters (a ZeRO optimizer's shard): the state
        this rank checkpoints."""
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return [opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt
                for opt in self.optimizers]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)
