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
device, shard, then `to_empty` + initialise or load a checkpoint (see moeflow.parallel.checkpoint).

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
from moeflow.train.checkpoint import model_tensors

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


def sharded_experts(model: nn.Module) -> dict[str, Experts]:
    """{state-dict prefix 'blocks.i.ffn.experts.': module} of the sharded Experts of a model."""
    return {f"{name}.": m for name, m in model.named_modules()
            if isinstance(m, Experts) and m.layout is not None}


@torch.no_grad()
def load_full_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full (unsharded) state dict into a sharded model: each rank takes its part."""
    sharded = sharded_experts(model)
    own = model.state_dict(keep_vars=True)
    for key, full in state.items():
        prefix, _, name = key.rpartition(".")
        if prefix + "." in sharded:
            ex = sharded[prefix + "."]
            target = getattr(ex, name)
            if target is None:
                continue
            full = local_part(name, full.to(target.device), ex.layout,
                              ex.activation == "swiglu")
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
    """The full model's tensors (on CPU, each storage once as in
    moeflow.train.checkpoint.model_tensors: a tied head is the embedding) rebuilt from every
    rank's shard. Collective over each layer's EP group; all ranks return it (every replica
    gathers inside its own EP group)."""
    out = {k: v.cpu() for k, v in model_tensors(model).items()}
    for prefix, ex in sharded_experts(model).items():
        lay = ex.layout
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
