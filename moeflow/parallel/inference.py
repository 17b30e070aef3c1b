"""Serving one model on several ranks: tensor slicing × expert parallelism (DeepSpeed-MoE §5).

    torchrun --nproc-per-node 4 -m moeflow generate --checkpoint DIR --tp 2 --ep 2 --prompt "def "
    torchrun --nproc-per-node 4 -m moeflow serve --model DIR --tp 2 --ep 2

World = tp × ep ranks, numbered rank = replica·tp + t:
  * dense parts (attention heads, dense and shared MLPs, PR-MoE's residual MLP) are tensor-sliced
    over each TP group of `tp` consecutive ranks (moeflow.parallel.tensor) and replicated over
    the `ep` groups;
  * experts are spread over all tp×ep ranks (moeflow.parallel.mesh with ep = world and expert
    slicing), so each expert lives once: E/world experts per rank, or, for a layer with fewer
    experts than ranks, each expert's hidden width split over world/E ranks (partial outputs
    summed on combine). Tokens reach them through the training side's exchange
    (moeflow.parallel.dispatcher: uneven all-to-all, hierarchical across nodes on request).
Rank 0 owns the scheduler and broadcasts every forward's inputs (moeflow.infer.ranks), so every
rank holds the same tokens. The `a2a` choice decides who sends them to the experts: "plain",
every rank sends all of them (each expert computes each row once per rank); "coordinated", the
ranks split them, each exchanges its share and the outputs are all-gathered
(moeflow.parallel.coordinated). Under the broadcast batch the ranks sharing tokens are all of
them (the TP group and its replicas), so the split is over the whole world.

`check_layout` refuses a layout that does not fit the model (heads, kv heads or widths not
divisible by tp, experts not divisible over the ranks, world ≠ tp × ep) in one line, from the
config alone, before any process group is used or any weight is read. `load_shard` builds the
rank's modules on the meta device and reads only their chunks of a moeflow checkpoint
(moeflow.checkpoint), whatever layout wrote it, or of a HF MoE directory
(moeflow.interop.hf_shard).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from moeflow.config import ModelConfig
from moeflow.model.attention import Attention
from moeflow.model.mla import MLAttention
from moeflow.model.mlp import MLP
from moeflow.model.moe import MoELayer
from moeflow.ops.backend import Backends
from moeflow.parallel.coordinated import CoordinatedDispatcher
from moeflow.parallel.dispatcher import AllToAllDispatcher
from moeflow.parallel.mesh import LayerLayout, ParallelConfig, ParallelLayout, ProcessGroups
from moeflow.parallel.tensor import TensorSlice
from moeflow.validate import choice, integer, number, option

A2A = ("coordinated", "plain")


@dataclass(frozen=True)
class InferenceParallel:
    """How one served model spreads over the ranks torchrun started (world = tp × ep)."""

    tp: int = option("tensor-parallel size: split attention heads and dense MLPs over this many "
                     "ranks", default=1)
    ep: int = option("expert-parallel replicas of the dense parts; experts are spread over all "
                     "tp×ep ranks (must equal the number of processes divided by --tp)",
                     default=1)
    a2a: str = option("token exchange to the experts: coordinated (ranks split the tokens, "
                      "then all-gather) or plain (every rank sends every token)",
                      choices=A2A, default="coordinated")
    hierarchical: bool = option("exchange tokens inside a node first, then across nodes",
                                default=False)
    timeout_s: float = option("seconds any collective may wait for the other ranks before the "
                              "run fails (a dead or stalled rank)", default=120.0)

    def __post_init__(self) -> None:
        integer("tp", self.tp, lo=1)
        integer("ep", self.ep, lo=1)
        choice("a2a", self.a2a, A2A)
        number("timeout_s", self.timeout_s, lo=0, lo_open=True)

    @property
    def world(self) -> int:
        return self.tp * self.ep


def moe_layer_experts(config: ModelConfig) -> dict[int, int]:
    return {i: spec.num_experts for i, spec in enumerate(config.ffn_specs()) if spec.is_moe}


def _expert_config(par: InferenceParallel, ranks_per_node: int = 0) -> ParallelConfig:
    return ParallelConfig(ep=par.world, expert_slicing=True, exchange="uneven",
                          hierarchical=par.hierarchical, ranks_per_node=ranks_per_node)


def check_layout(config: ModelConfig, par: InferenceParallel, world: int) -> None:
    """ValueError in one line if `par` does not fit `config` on `world` ranks."""
    where = f"--tp {par.tp} --ep {par.ep}"
    if par.world != world:
        raise ValueError(f"{where}: needs tp × ep = {par.world} processes, but {world} were "
                         f"started (torchrun --nproc-per-node)")
    tp = par.tp
    widths = [("n_heads", config.n_heads)]
    if config.mla is None:
        widths.append(("n_kv_heads (key/value heads)", config.n_kv_heads))
    for i, spec in enumerate(config.ffn_specs()):
        if not spec.is_moe:
            widths.append((f"layer {i} d_ff", spec.d_ff))
        else:
            if spec.shared_d_ff:
                widths.append((f"layer {i} shared_d_ff", spec.shared_d_ff))
            if spec.kind == "residual_moe":
                widths.append((f"layer {i} residual d_ff", spec.d_ff))
    for what, n in widths:
        if n % tp:
            raise ValueError(f"{where}: the model's {what} = {n} is not divisible by tp={tp}")
    if tp > 1 and config.qk_norm and config.qk_norm_scope == "full":
        raise ValueError(f"{where}: qk_norm_scope='full' normalises over all heads at once; "
                         f"tensor slicing supports only per-head qk norms (use --tp 1)")
    try:
        layout = ParallelLayout.build(_expert_config(par), world, 0, moe_layer_experts(config))
    except ValueError as e:
        raise ValueError(f"{where}: experts are spread over all {world} ranks: {e}") from None
    for lay in layout.layers:
        d_ff = config.ffn_specs()[lay.layer].expert_d_ff
        if d_ff % lay.slices:
            raise ValueError(f"{where}: layer {lay.layer}'s {lay.num_experts} experts are sliced "
                             f"over {lay.slices} ranks each, but expert_d_ff={d_ff} is not "
                             f"divisible by {lay.slices}")


class InferenceMesh:
    """The process groups and per-layer collaborators of one rank (torch.distributed must be
    initialised, on every rank with the same `par`; groups are created here, collectively)."""

    def __init__(self, config: ModelConfig, par: InferenceParallel, ranks_per_node: int = 0
                 ) -> None:
        world, rank = dist.get_world_size(), dist.get_rank()
        check_layout(config, par, world)
        self.par, self.world, self.rank = par, world, rank
        self.layout = ParallelLayout.build(_expert_config(par, ranks_per_node), world, rank,
                                           moe_layer_experts(config))
        self.groups = ProcessGroups(self.layout)
        self.tp = None
        if par.tp > 1:
            blocks = [list(range(s, s + par.tp)) for s in range(0, world, par.tp)]
            group, _ = dist.new_subgroups_by_enumeration(blocks)
            self.tp = TensorSlice(par.tp, rank % par.tp, group)

    def dispatcher(self, lay: LayerLayout, backends: Backends) -> nn.Module:
        plain = AllToAllDispatcher(lay, self.groups.for_layer(lay), "uneven",
                                   self.par.hierarchical, backends)
        if self.par.a2a == "plain" or self.world == 1:
            return plain
        return CoordinatedDispatcher(plain, self.groups.world_group, self.world, self.rank)

    def build(self, config: ModelConfig, backends: Backends = Backends()) -> nn.Module:
        """This rank's shard of the model, on the current default device (meta when loading):
        each block's attention and FFN constructed with their tensor slice, expert layout and
        dispatcher."""
        from moeflow.model import Transformer

        model = Transformer(config, backends)
        activation = "gelu" if config.arch == "gpt" else "swiglu"
        attention = MLAttention if config.mla else Attention
        for i, (block, spec) in enumerate(zip(model.blocks, config.ffn_specs())):
            block.attn = attention(config, i, backends, tp=self.tp)
            if spec.is_moe:
                lay = self.layout.layer(i)
                block.ffn = MoELayer(spec, config.d_model, activation, config.mlp_bias, backends,
                                     layout=lay, dispatcher=self.dispatcher(lay, backends),
                                     tp=self.tp)
            else:
                block.ffn = MLP(config.d_model, spec.d_ff, activation, config.mlp_bias, backends,
                                tp=self.tp)
        return model


def load_shard(path: str | Path, par: InferenceParallel, device: torch.device,
               dtype: torch.dtype | None = None, backends: Backends = Backends(),
               ranks_per_node: int = 0) -> nn.Module:
    """This rank's shard of the checkpoint at `path`, in eval mode: a moeflow checkpoint (a
    model directory or a training step checkpoint, any layout) or a HF MoE directory
    (moeflow.interop.hf_shard); every rank reads only its chunks. Collective."""
    from moeflow.checkpoint.model_dir import MANIFEST, load_model
    from moeflow.interop.pretrained import read_config

    path = Path(path)
    config, model_type = read_config(path)
    check_layout(config, par, dist.get_world_size())
    mesh = InferenceMesh(config, par, ranks_per_node)
    if model_type is None or (path / MANIFEST).is_file():
        return load_model(path, device, dtype, build=lambda c: mesh.build(c, backends))
    return _load_hf_shard(path, config, model_type, mesh, device, dtype, backends)


def _load_hf_shard(path: Path, config: ModelConfig, model_type: str, mesh: InferenceMesh,
                   device: torch.device, dtype: torch.dtype | None, backends: Backends
                   ) -> nn.Module:
    from moeflow.checkpoint.chunks import model_chunks
    from moeflow.interop.hf_shard import read_hf_chunks
    from moeflow.interop.hf_weights import SafetensorsDir

    with torch.device("meta"):
        model = mesh.build(config, backends)
    model = model.to_empty(device=device)
    if config.tie_embeddings:  # to_empty allocates each parameter anew: share the head again
        model.lm_head.weight = model.tok_emb.weight
    if dtype is not None:  # buffers (the router's expert bias) stay fp32, as in load_model
        for p in model.parameters():
            p.data = p.data.to(dtype)
    read_hf_chunks(config, model_type, SafetensorsDir(path), model_chunks(model), str(path))
    return model.eval()
