"""Turn a full Transformer into this rank's shard.

Every rank builds (or loads) the same full model; then each MoE layer is rebuilt as this rank's
share of it: a new MoELayer constructed with its `layout` (its Experts hold only this rank's
experts' rows of the stacked weights, or with expert slicing its slice of one expert's hidden
width F), an AllToAllDispatcher over the layer's EP group and the router's `stats_reduce`, all
three from the run's one ProcessGroups. The new layer is built on the meta device (no memory, no
RNG draws) and takes the old layer's tensors by assignment: the dense ones as they are (the same
Parameter objects), the expert ones cut to this rank's part. Dense parameters stay whole on
every rank. Building the full model first is what makes a sharded run start from exactly the
weights of a 1-process run with the same seed; for models too large for that, build on the meta
device, shard, then `to_empty` + initialise, or load a checkpoint into the shards
(moeflow.checkpoint reads any layout).

The gradient reduction and the checkpoint code read each Experts module's declared `layout`.

Legend: E experts, El local experts, D model dim, F expert ffn dim, I = F or 2F (SwiGLU gate|up),
s slices per expert.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeflow.model.experts import Experts
from moeflow.model.moe import MoELayer
from moeflow.model.router import StatsReduce
from moeflow.parallel.dispatcher import AllToAllDispatcher
from moeflow.parallel.mesh import LayerLayout, ParallelConfig, ParallelLayout, ProcessGroups

EXPERT_TENSORS = ("w_in_EDI", "b_in_EI", "w_out_EFD", "b_out_ED")


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


def _assign_shard(module: nn.Module, full: nn.Module, prefix: str, lay: LayerLayout,
                  swiglu: bool) -> nn.Module:
    """Give `module` (built on the meta device with `lay`) the tensors of its full twin `full`:
    the expert tensors under `prefix` cut to this rank's part, the others as they are."""
    want = module.state_dict(keep_vars=True)
    state = {}
    for key, t in full.state_dict(keep_vars=True).items():
        if key not in want:  # the output bias of a later expert slice
            continue
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name in EXPERT_TENSORS:
            t = nn.Parameter(local_part(name, t.detach(), lay, swiglu).clone(),
                             requires_grad=t.requires_grad)
        state[key] = t
    trainable = {key: t.requires_grad for key, t in state.items()}
    module.load_state_dict(state, assign=True)
    for key, t in module.state_dict(keep_vars=True).items():
        t.requires_grad_(trainable[key])  # assign=True takes the flag of the meta twin
    return module


def shard_experts(experts: Experts, lay: LayerLayout) -> Experts:
    """A new Experts module built with `lay`, holding this rank's part of `experts`."""
    with torch.device("meta"):
        part = Experts(experts.num_experts, experts.d_model, experts.d_ff, experts.activation,
                       experts.b_in_EI is not None, experts.backends, layout=lay)
    return _assign_shard(part, experts, "", lay, experts.activation == "swiglu")


def shard_layer(layer: MoELayer, lay: LayerLayout, dispatcher: nn.Module,
                stats_reduce: StatsReduce | None) -> MoELayer:
    """A new MoELayer built with `lay`, `dispatcher` and `stats_reduce`, holding this rank's
    part of `layer` (its dense tensors are the same objects)."""
    if layer.experts.layout is not None:
        raise ValueError(f"layer {lay.layer} is already sharded")
    with torch.device("meta"):
        part = MoELayer(layer.spec, layer.d_model, layer.activation, layer.bias, layer.backends,
                        layout=lay, dispatcher=dispatcher, stats_reduce=stats_reduce)
    return _assign_shard(part, layer, "experts.", lay, layer.activation == "swiglu").train(
        layer.training)


def shard_model(model: nn.Module, config: ParallelConfig) -> ProcessGroups:
    """Replace each MoE layer of `model` by this rank's share of it (torch.distributed must be
    initialised); returns the run's process groups, whose `layout` is the model's."""
    layout = ParallelLayout.build(config, dist.get_world_size(), dist.get_rank(),
                                  moe_layer_experts(model))
    groups = ProcessGroups(layout)
    for lay in layout.layers:
        block = model.blocks[lay.layer]
        dispatcher = AllToAllDispatcher(lay, groups.for_layer(lay), config.exchange,
                                        config.hierarchical, block.ffn.backends)
        block.ffn = shard_layer(block.ffn, lay, dispatcher, groups.stats_reduce)
    return groups
