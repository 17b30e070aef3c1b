"""The trainer on N ranks: the single-process loop with its small steps swapped for parallel ones.

    torchrun --nproc-per-node 4 -m moeflow train --preset tiny --batch-size 16 --ep 2
    trainer = ParallelTrainer(TrainConfig(...), ParallelConfig(ep=2), init_distributed())

The loop itself (moeflow.train.trainer.Trainer) is unchanged; this class overrides its hooks:
* parallelize: the full model is built from the same seed on every rank, then sharded
  (moeflow.parallel.shard), so step 0 starts from the exact weights of a 1-process run.
* build_optimizer: AdamW per replication group, ZeRO-sharded with ParallelConfig.zero.
* sync_gradients / clip_gradients: moeflow.parallel.grads (global-batch mean, global norm);
  the dense gradients' all-reduce overlaps backward (moeflow.parallel.overlap) unless
  ParallelConfig.overlap_grads is off.
* reduce_stats: the metrics row and the validation result are the global batch's (losses
  averaged over ranks, expert counts summed, all in one all-reduce), and so are the counts that
  drive aux-loss-free bias updates. Each rank validates its share of the global windows.
* local_optimizers / checkpoint_group: the trainer's one checkpoint writer
  (moeflow.train.checkpoint) runs on every rank; each writes its chunks of the global,
  layout-free tensors (experts by global id) and of the optimizer state, nothing is gathered,
  and a checkpoint saved at one layout resumes, AdamW moments included, at any other.

Batch sizes are global (TrainConfig.batch_size over all ranks): each rank takes its slice of the
same global batch, so 1 and N processes see the same samples. With dropless routing the run is
layout-independent up to float rounding; capacity-based dropping is decided per rank on the
rank's own tokens (as in DeepSpeed), so capacity-limited runs differ across world sizes.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from rich.console import Console

from moeflow.train.progress import ProgressReporter
from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import Trainer, TrainResult
from moeflow.parallel.grads import (ShardedOptimizer, clip_grad_norm_, reduce_gradients,
                                    replication_groups)
from moeflow.parallel.launch import DistEnv, init_distributed, shutdown
from moeflow.parallel.mesh import ParallelConfig
from moeflow.parallel.overlap import OverlappedGradReducer
from moeflow.parallel.shard import shard_model


class ParallelTrainer(Trainer):
    def __init__(self, config: TrainConfig, parallel: ParallelConfig, env: DistEnv,
                 reporter: ProgressReporter | None = None) -> None:
        super().__init__(config, rank=env.rank, world=env.world, reporter=reporter)
        if parallel.hierarchical and not parallel.ranks_per_node:
            parallel = dataclasses.replace(parallel, ranks_per_node=env.local_world)
        self.parallel, self.env = parallel, env

    def resolve_device(self) -> torch.device:
        return self.env.device

    @property
    def reporter(self) -> ProgressReporter:
        if self._reporter is None:
            quiet = Console(quiet=not self.is_writer)
            self._reporter = ProgressReporter(self.cfg.steps, self.start_step,
                                              enabled=self.cfg.progress and self.is_writer,
                                              console=quiet)
        return self._reporter

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        self.groups = shard_model(model, self.parallel)
        self.overlap = None
        if self.parallel.overlap_grads and self.world > 1:
            dense = replication_groups(model, self.groups)[0][1]
            self.overlap = OverlappedGradReducer(dense, self.groups.world_group, self.world)
        self._micro = 0
        return model

    def forward_loss(self, input_BT, target_BT, step, groups_BT=None):
        self._micro += 1
        if self.overlap is not None and self._micro % self.grad_accum == 0:
            self.overlap.arm()  # the backward after this forward is the step's last
        return super().forward_loss(input_BT, target_BT, step, groups_BT)

    def build_optimizer(self, model: torch.nn.Module) -> ShardedOptimizer:
        return ShardedOptimizer(model, self.groups, torch.optim.AdamW, self.param_groups(model),
                                zero=self.parallel.zero, lr=self.cfg.lr,
                                betas=(self.cfg.beta1, self.cfg.beta2), eps=1e-8)

    def sync_gradients(self) -> None:
        if self.overlap is not None:
            self.overlap.finish()
        reduce_gradients(self.model, self.groups, dense=self.overlap is None)

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(self.model, self.groups, max_norm)

    def reduce_stats(self, sums, counts):
        """One all-reduce of the sums (then averaged over ranks) and the counts (summed, exact
        in float64)."""
        keys = sorted(sums)
        counts = counts or []
        flat = torch.cat([torch.stack([sums[k].to(self.device, torch.float64) for k in keys])]
                         + [c.to(self.device, torch.float64).view(-1) for c in counts])
        dist.all_reduce(flat, group=self.groups.world_group)
        head, *summed = flat.split([len(keys)] + [c.numel() for c in counts])
        sums = dict(zip(keys, (head / self.world).unbind()))
        return sums, [t.round().to(c.device, c.dtype).view_as(c)
                      for t, c in zip(summed, counts)] or None

    def stop_requested(self, local: bool) -> bool:
        """A signal seen by any rank stops every rank after the same step (save is collective)."""
        flag = torch.tensor([int(local)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.groups.world_group)
        return bool(flag.item())

    def local_optimizers(self) -> list[torch.optim.Optimizer]:
        return self.optimizer.local_optimizers()

    @property
    def checkpoint_group(self):
        return self.groups.world_group


def train(config: TrainConfig, parallel: ParallelConfig) -> TrainResult | None:
    """Run `config` on the ranks torchrun started (or in this process when there are none).
    Returns the result on rank 0 and None on the other ranks (so only one prints it)."""
    if "WORLD_SIZE" not in os.environ:
        if parallel.ep > 1:
            raise ValueError(f"ep={parallel.ep} needs several processes: launch with "
                             f"torchrun --nproc-per-node N -m moeflow train ...")
        return Trainer(config).run()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is available")
    env = init_distributed(None if config.device == "auto" else config.device)
    try:
        result = ParallelTrainer(config, parallel, env).run()
        return result if env.is_main else None
    finally:
        shutdown(env)
