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

EXPERT_TENSORS = ("w_in_EDI", "b_in_EI", "w_out_EFD", "b_out_ED")


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


def local_part(name: str, full: torch.Tensor, lay: LayerLayout, swiglu: bool) -> torch.Tensor:
    """This rank's part of a full stacked expert tensor (`name` one of EXPERT_TENSORS)."""
    return slice_part(name, full[torch.tensor(lay.expert_ids, device=full.device)], lay, swiglu)


def slice_part(name: str, part: torch.Tensor, lay: LayerLayout, swiglu: bool) -> torch.Tensor:
    """This rank's slice of its experts' full-width tensor (identity without slicing)."""
    if lay.slices == 1 or name == "b_out_ED":
        return part
    F = part.shape[1] if name == "w_out_EFD" else part.shape[-1] // (2 if swiglu else 1)
    cols = slice_columns(F, lay.slices, lay.slice_index, swiglu).to(part.device)
    return part[:, cols[: F // lay.slices]] if name == "w_out_EFD" else part[..., cols]


def join_slices(name: str, parts: list[torch.Tensor], swiglu: bool) -> torch.Tensor:
    """Inverse of `local_part` over the s slices of one expert (slice order)."""
    if name == "b_out_ED":
        return parts[0]
    if name == "w_out_EFD":
        return torch.cat(parts, -2)
    if swiglu:  # each slice is [gate_j | up_j]; the full tensor is [gate_0..s | up_0..s]
        halves = [p.chunk(2, dim=-1) for p in parts]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves], -1)
    return torch.cat(parts, -1)


def shard_experts(experts: Experts, lay: LayerLayout) -> None:
    """Keep this rank's experts (or expert slice) of `experts`; record the layout on it."""
    if experts.num_experts != lay.num_experts:
        raise ValueError(f"layer {lay.layer}: model has {experts.num_experts} experts, layout "
                         f"expects {lay.num_experts}")
    swiglu = experts.activation == "swiglu"
    for name in EXPERT_TENSORS:
        t = getattr(experts, name)
        if t is None:
            continue
        if name == "b_out_ED" and lay.slices > 1 and lay.slice_index != 0:
            # The partial outputs of the s slices are summed: only slice 0 adds the bias.
            setattr(experts, name, None)
            continue
        new = local_part(name, t.detach(), lay, swiglu).clone()
        setattr(experts, name, nn.Parameter(new, requires_grad=t.requires_grad))
    if lay.slices > 1:
        experts.d_ff //= lay.slices
    experts.num_experts = len(lay.expert_ids)
    experts.layout = lay


def sharded_experts(model: nn.Module) -> dict[str, tuple[Experts, LayerLayout]]:
    """{state-dict prefix 'blocks.i.ffn.experts.': (module, layout)} of a sharded model."""
    return {f"{name}.": (m, m.layout) for name, m in model.named_modules()
            if isinstance(m, Experts) and getattr(m, "layout", None) is not None}


@torch.no_grad()
def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a sharded model: each rank takes its part."""
    sharded = sharded_experts(model)
    own = model.state_dict(keep_vars=True)
    for key, full in state.items():
        prefix, _, name = key.rpartition(".")
        if prefix + "." in sharded:
            ex, lay = sharded[prefix + "."]
            target = getattr(ex, name)
            if target is None:
                continue
            full = local_part(name, full.to(target.device), lay, ex.activation == "swiglu")
        else:
            target = own.get(key)
            if target is None:
                raise ValueError(f"state has tensor {key!r} that the model lacks")
        if tuple(full.shape) != tuple(target.shape):
            raise ValueError(f"{key}: shape {list(full.shape)} in the state but "
                             f"{list(target.shape)} in the model")
        target.copy_(full)


@torch.no_grad()
def gather_full_state(model: nn.Module, groups: ProcessGroups) -> dict[str, torch.Tensor]:
    """The full state dict (on CPU) rebuilt from every rank's shard. Collective over each
    layer's EP group; all ranks return it (every replica gathers inside its own EP group)."""
    out = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    for prefix, (ex, lay) in sharded_experts(model).items():
        group = groups.for_layer(lay).ep
        P, s = lay.ep_size, lay.slices
        swiglu = ex.activation == "swiglu"
        for name in EXPERT_TENSORS:
            t = getattr(ex, name)
            if t is None and not (name == "b_out_ED" and ex.b_in_EI is not None):
                continue
            if t is None:  # a later slice of a biased layer: no b_out here, send zeros
                t = torch.zeros(1, ex.d_model, device=ex.w_in_EDI.device,
                                dtype=ex.w_in_EDI.dtype)
            parts = [torch.empty_like(t) for _ in range(P)]
            if P > 1:
                dist.all_gather(parts, t.detach().contiguous(), group=group)
            else:
                parts = [t.detach()]
            if s > 1:
                full = torch.stack([join_slices(name, [p[0] for p in parts[e * s:(e + 1) * s]],
                                                swiglu) for e in range(P // s)])
            else:
                full = torch.cat(parts)
            out[prefix + name] = full.cpu()
    return out


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
                                              config.hierarchical, layer.backends)
        layer.router.stats_reduce = reduce
    model.parallel_layout = layout
    model.parallel_groups = groups
    return groups
