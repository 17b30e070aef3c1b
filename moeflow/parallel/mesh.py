"""How ranks are laid out: data parallel × expert parallel, decided per MoE layer.

Every rank is a data-parallel rank for the dense (non-expert) parameters: the global batch is split
over all `world` ranks. Experts are spread per layer, because PR-MoE models mix expert counts
(e.g. 32 and 64 experts on 64 GPUs) and a single expert-parallel size cannot fit them all:

  ep  = the largest expert-parallel size (ParallelConfig.ep; must divide world)
  layer with E >= ep experts:   EP group of ep ranks, E/ep experts per rank (E % ep == 0)
  layer with E <  ep experts:   without slicing, EP group of E ranks (one expert per rank) and
                                the rest replicas; with expert slicing, EP group of ep ranks and
                                each expert's hidden width F split over ep/E ranks (tensor-parallel
                                experts, their partial outputs summed on combine).

Ranks are numbered rank = replica * p + position, with p the layer's EP size: an EP group is a
contiguous block of p ranks (so with ranks_per_node >= p the exchange stays inside one node, where
bandwidth is highest) and the ranks holding the same experts (the layer's expert-data-parallel
group, which averages their gradients) are strided by p.

`ParallelLayout` and `LayerLayout` are pure arithmetic (no process groups), so they can be built
and tested without torch.distributed. `ProcessGroups` turns a layout into process groups, once:
it is the one object through which the rest of moeflow.parallel reaches a group (the exchange
groups of each EP size, the data-parallel world, the routing-statistics reduction over it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeflow.validate import choice, integer, option

EXCHANGES = ("auto", "uneven", "capacity")


@dataclass(frozen=True)
class ParallelConfig:
    """How a run spreads over ranks (the run-level knobs; the model says how many experts).

    ep: largest expert-parallel size (1 = pure data parallel). expert_slicing: split experts over
    ranks when a layer has fewer experts than ep (else such layers use fewer EP ranks and more
    replicas). hierarchical: exchange tokens inside a node first, then across nodes, with
    ranks_per_node ranks per node (0 = all ranks on one node). exchange: "uneven" (exact split
    sizes, needed when dropless), "capacity" (every expert gets exactly `capacity` slots from
    every rank, the DeepSpeed layout), "auto" (capacity when the router has one, else uneven).
    zero: shard optimizer state over each parameter's data-parallel ranks (ZeRO-1).
    overlap_grads: reduce dense gradients during backward (moeflow.parallel.overlap).
    """

    ep: int = option("expert-parallel size: spread each MoE layer's experts over this many ranks "
                     "(must divide the number of processes; 1 = pure data parallel)", default=1)
    expert_slicing: bool = option("split experts' hidden width over ranks when a layer has fewer "
                                  "experts than --ep (else such layers use fewer EP ranks and "
                                  "more replicas)", default=False)
    hierarchical: bool = option("hierarchical all-to-all: exchange inside a node first, then "
                                "across nodes", default=False)
    ranks_per_node: int = option("ranks per node for --hierarchical (0 = LOCAL_WORLD_SIZE from "
                                 "torchrun)", default=0)
    exchange: str = option("token exchange: uneven (exact splits, dropless), capacity (fixed "
                           "slots per expert), auto (capacity when the router has one)",
                           choices=EXCHANGES, default="auto")
    zero: bool = option("shard AdamW state over each parameter's data-parallel ranks (ZeRO-1)",
                        default=False)
    overlap_grads: bool = option("all-reduce dense gradients in buckets during backward "
                                 "(DDP-style overlap)", default=True)

    def __post_init__(self) -> None:
        integer("ep", self.ep, lo=1)
        integer("ranks_per_node", self.ranks_per_node, lo=0)
        choice("exchange", self.exchange, EXCHANGES)


@dataclass(frozen=True)
class LayerLayout:
    """Where one MoE layer's experts live, seen from one rank."""

    layer: int  # block index
    num_experts: int  # E, global
    world: int
    rank: int
    ep_size: int  # p: ranks in this layer's EP group
    slices: int  # s: ranks sharing one expert (expert slicing), 1 when not sliced

    @property
    def position(self) -> int:
        """This rank's index inside its EP group."""
        return self.rank % self.ep_size

    @property
    def replica(self) -> int:
        """Which copy of the layer's experts this rank belongs to."""
        return self.rank // self.ep_size

    @property
    def num_replicas(self) -> int:
        return self.world // self.ep_size

    @property
    def experts_per_rank(self) -> int:
        return max(self.num_experts // self.ep_size, 1)

    @property
    def expert_ids(self) -> tuple[int, ...]:
        """Global ids of the experts (or expert slices) held here, in local order."""
        if self.slices > 1:
            return (self.position // self.slices,)
        first = self.position * self.experts_per_rank
        return tuple(range(first, first + self.experts_per_rank))

    @property
    def slice_index(self) -> int:
        return self.position % self.slices

    def ep_group_ranks(self, replica: int | None = None) -> tuple[int, ...]:
        r = self.replica if replica is None else replica
        return tuple(range(r * self.ep_size, (r + 1) * self.ep_size))

    def expert_dp_ranks(self, position: int | None = None) -> tuple[int, ...]:
        """Ranks holding the same experts as `position` (default: this rank's)."""
        pos = self.position if position is None else position
        return tuple(pos + k * self.ep_size for k in range(self.num_replicas))

    def owners(self, expert: int) -> tuple[int, ...]:
        """EP-group positions holding (a slice of) global expert `expert`."""
        if self.slices > 1:
            return tuple(range(expert * self.slices, (expert + 1) * self.slices))
        return (expert // self.experts_per_rank,)


@dataclass(frozen=True)
class ParallelLayout:
    """The whole model's layout on `world` ranks, seen from `rank`."""

    config: ParallelConfig
    world: int
    rank: int
    layers: tuple[LayerLayout, ...]

    @classmethod
    def build(cls, config: ParallelConfig, world: int, rank: int,
              moe_layers: dict[int, int]) -> "ParallelLayout":
        """moe_layers: {block index: number of experts}."""
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of {world}")
        if world % config.ep:
            raise ValueError(f"ParallelConfig.ep ({config.ep}) must divide the world size "
                             f"({world})")
        rpn = config.ranks_per_node
        if config.hierarchical and rpn and world % rpn:
            raise ValueError(f"ParallelConfig.ranks_per_node ({rpn}) must divide the world size "
                             f"({world})")
        layers = []
        for layer, E in sorted(moe_layers.items()):
            if E >= config.ep:
                if E % config.ep:
                    raise ValueError(f"layer {layer}: {E} experts cannot be split evenly over "
                                     f"ep={config.ep} ranks")
                p, s = config.ep, 1
            else:
                if config.ep % E:
                    raise ValueError(f"layer {layer}: {E} experts do not divide ep={config.ep}, "
                                     f"so neither slicing nor replicas fit")
                p, s = (config.ep, config.ep // E) if config.expert_slicing else (E, 1)
            layers.append(LayerLayout(layer, E, world, rank, p, s))
        return cls(config, world, rank, tuple(layers))

    def layer(self, index: int) -> LayerLayout:
        for lay in self.layers:
            if lay.layer == index:
                return lay
        raise KeyError(f"block {index} is not an MoE layer")

    @property
    def ep_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({lay.ep_size for lay in self.layers}))

    @property
    def ranks_per_node(self) -> int:
        return self.config.ranks_per_node or self.world


def _partition(world: int, block: int, strided: bool) -> list[list[int]]:
    """Contiguous blocks of `block` ranks, or the strided groups that take one from each block."""
    if strided:
        return [list(range(pos, world, block)) for pos in range(block)]
    return [list(range(start, start + block)) for start in range(0, world, block)]


@dataclass(frozen=True)
class ExchangeGroups:
    """The process groups one EP size needs (None where torch.distributed is unused)."""

    ep: object  # this rank's EP group
    expert_dp: object  # ranks holding the same experts
    intra: object | None  # hierarchical: this rank's node inside its EP group
    inter: object | None  # hierarchical: same local index on every node of the EP group
    ranks_per_node: int  # L: 0 when the exchange is flat


class SumOverRanks:
    """A routing-statistics reduction (the `stats_reduce` a Router is built with): counts_E
    summed over the ranks of `group`, returned as a new tensor (the input is left as it was)."""

    def __init__(self, group) -> None:
        self.group = group

    def __call__(self, counts_E: torch.Tensor) -> torch.Tensor:
        out = counts_E.clone()
        dist.all_reduce(out, group=self.group)
        return out


class ProcessGroups:
    """All process groups of a layout, created once, in the same order on every rank.

    torch.distributed requires every rank to take part in creating every group, including groups
    it is not a member of; building them all here, from the pure layout, guarantees that.
    `world_group` is the data-parallel group of the dense parameters and of the routing
    statistics; `stats_reduce` sums a router's counts over it (None on one rank: nothing to sum).
    """

    def __init__(self, layout: ParallelLayout) -> None:
        self.layout = layout
        self.world_group = dist.group.WORLD
        self.stats_reduce = SumOverRanks(self.world_group) if layout.world > 1 else None
        world, rpn = layout.world, layout.ranks_per_node
        self._by_size: dict[int, ExchangeGroups] = {}
        for p in layout.ep_sizes:
            ep, _ = dist.new_subgroups_by_enumeration(_partition(world, p, strided=False))
            dp, _ = dist.new_subgroups_by_enumeration(_partition(world, p, strided=True))
            intra = inter = None
            L = 0
            if layout.config.hierarchical and p > rpn:
                if p % rpn:
                    raise ValueError(f"ranks_per_node ({rpn}) must divide every EP size, got {p}")
                L = rpn
                intra, _ = dist.new_subgroups_by_enumeration(_partition(world, L, strided=False))
                inter_lists = []
                for start in range(0, world, p):
                    for j in range(L):
                        inter_lists.append(list(range(start + j, start + p, L)))
                inter, _ = dist.new_subgroups_by_enumeration(inter_lists)
            self._by_size[p] = ExchangeGroups(ep, dp, intra, inter, L)

    def for_layer(self, layer: LayerLayout) -> ExchangeGroups:
        return self._by_size[layer.ep_size]

    def by_size(self, ep_size: int) -> ExchangeGroups:
        return self._by_size[ep_size]
