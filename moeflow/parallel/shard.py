"""Turn a full Transformer into this rank's shard, in place.

Every rank builds (or loads) the same full model and keeps, per MoE layer, only its own experts'
rows of the stacked weights — or, with expert slicing, its slice of one expert's hidden width F —
and swaps the layer's LocalDispatcher for an AllToAllDispatcher. Dense parameters stay whole on
every rank. Building the full model first is what makes a sharded run start from exactly the
weights of a 1-process run with the same seed; for models too large for that, build on the meta
device, shard, then `to_empty` + initialise or load a checkpoint (see moeflow.parallel.checkpoint).

Each sharded `Experts` module records `layout` (its LayerLayout: global expert ids, slice index),
which the gradient reduction and the checkpoint code read.

Legend: E experts, El local experts, D model dim, F expert ffn dim, I = F or 2F (SwiGLU gate|up),
s slices per expert.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeflow.model.experts import Experts
from moeflow.model.moe import MoELayer
from moeflow.parallel.dispatcher import AllToAllDispatcher
from moeflow.parallel.mesh import LayerLayout, ParallelConfig, ParallelLayout, ProcessGroups


class SumOverRanks:
    """Routing-statistics reduction for Router.stats_reduce: sums counts over a process group."""

    def __init__(self, group) -> None:
        self.group = group

    def __call__(self, counts_E: torch.Tensor) -> torch.Tensor:
        out = counts_E.clone()
        dist.all_reduce(out, group=self.group)
        return out


def moe_layer_experts(model: nn.Module) -> dict[int, int]:
    """{block index: number of experts} of a (full) Transformer."""
    return {i: block.ffn.spec.num_experts for i, block in enumerate(model.blocks)
            if isinstance(block.ffn, MoELayer)}


def slice_columns(F: int, slices: int, index: int, swiglu: bool) -> torch.Tensor:
    """Columns of the first projection (width I) that slice `index` of `slices` keeps."""
    if F % slices:
        raise ValueError(f"expert_d_ff ({F}) must be divisible by the {slices} expert slices")
    width = F // slices
    cols = torch.arange(index * width, (index + 1) * width)
    return torch.cat([cols, cols + F]) if swiglu else cols


def shard_experts(experts: Experts, lay: LayerLayout) -> None:
    """Keep this rank's experts (or expert slice) of `experts`; record the layout on it."""
    if experts.num_experts != lay.num_experts:
        raise ValueError(f"layer {lay.layer}: model has {experts.num_experts} experts, layout "
                         f"expects {lay.num_experts}")
    ids = torch.tensor(lay.expert_ids)
    keep = {"w_in_EDI": ids, "b_in_EI": ids, "w_out_EFD": ids, "b_out_ED": ids}
    tensors = {name: getattr(experts, name) for name in keep if getattr(experts, name) is not None}
    new = {name: t.detach()[ids.to(t.device)] for name, t in tensors.items()}
    F = experts.d_ff
    if lay.slices > 1:
        cols = slice_columns(F, lay.slices, lay.slice_index, experts.activation == "swiglu")
        new["w_in_EDI"] = new["w_in_EDI"][:, :, cols.to(new["w_in_EDI"].device)]
        if "b_in_EI" in new:
            new["b_in_EI"] = new["b_in_EI"][:, cols.to(new["b_in_EI"].device)]
        rows = cols[: F // lay.slices].to(new["w_out_EFD"].device)
        new["w_out_EFD"] = new["w_out_EFD"][:, rows]
        if "b_out_ED" in new and lay.slice_index != 0:
            # The partial outputs of the s slices are summed: only slice 0 adds the bias.
            del new["b_out_ED"]
            experts.b_out_ED = None
        experts.d_ff = F // lay.slices
    for name, t in new.items():
        setattr(experts, name, nn.Parameter(t.clone(), requires_grad=tensors[name].requires_grad))
    experts.num_experts = len(lay.expert_ids)
    experts.layout = lay


def shard_model(model: nn.Module, config: ParallelConfig, groups: ProcessGroups | None = None
                ) -> ProcessGroups:
    """Shard `model` for this rank (torch.distributed must be initialised); returns the groups."""
    world, rank = dist.get_world_size(), dist.get_rank()
    layout = ParallelLayout.build(config, world, rank, moe_layer_experts(model))
    if groups is None:
        groups = ProcessGroups(layout)
    reduce = SumOverRanks(groups.world_group) if world > 1 else None
    for lay in layout.layers:
        layer = model.blocks[lay.layer].ffn
        shard_experts(layer.experts, lay)
        layer.dispatcher = AllToAllDispatcher(lay, groups.for_layer(lay), config.exchange,
                                              config.hierarchical)
        layer.router.stats_reduce = reduce
    model.parallel_layout = layout
    model.parallel_groups = groups
    return groups
