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
* save / restore: rank 0 writes the trainer's usual checkpoint directory with the FULL model in
  model.safetensors (experts gathered from their EP groups, stacked by global expert id), so a
  checkpoint saved at one layout resumes at any other and `moeflow generate` reads it as is.
  Optimizer state is per rank (optimizer.pt holds every rank's, gathered to rank 0) and only
  reloads at the layout that saved it; at another layout the run resumes with fresh moments and
  says so. For models too large to gather on one rank, moeflow.parallel.checkpoint writes the
  experts from every rank instead.

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

from moeflow.train import checkpoint as ckpt_io
from moeflow.train.progress import ProgressReporter
from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import Trainer, TrainResult
from moeflow.parallel.grads import (ShardedOptimizer, clip_grad_norm_, reduce_gradients,
                                    replication_groups)
from moeflow.parallel.launch import DistEnv, init_distributed, shutdown
from moeflow.parallel.mesh import ParallelConfig
from moeflow.parallel.overlap import OverlappedGradReducer
from moeflow.parallel.shard import gather_full_state, load_full_state, shard_model


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

    def forward_loss(self, input_BT, target_BT, step):
        self._micro += 1
        if self.overlap is not None and self._micro % self.grad_accum == 0:
            self.overlap.arm()  # the backward after this forward is the step's last
        return super().forward_loss(input_BT, target_BT, step)

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

    def _layout_key(self) -> dict:
        return {"world": self.world, "parallel": vars(self.parallel)}

    def save(self, step: int):
        full = gather_full_state(self.model, self.groups)
        per_rank: list = [None] * self.world
        dist.all_gather_object(per_rank, self.optimizer.local_state_dict(),
                               group=self.groups.world_group)
        path = None
        if self.is_writer:
            state = {**self.train_state(step), "layout": self._layout_key()}
            path = ckpt_io.save_checkpoint(
                self.out, step, tensors=full,
                optimizer_state={"layout": self._layout_key(), "ranks": per_rank},
                state=state, tokenizer=self.tokenizer, model_config=self.model_config,
                run_config=self.cfg, keep=self.cfg.keep_checkpoints)
        dist.barrier(group=self.groups.world_group)
        return path

    def restore_model_and_optimizer(self, ckpt) -> None:
        load_full_state(self.model, ckpt_io.load_tensors(ckpt))
        saved = ckpt_io.load_torch(ckpt, "optimizer.pt")
        if isinstance(saved, dict) and saved.get("layout") == self._layout_key():
            self.optimizer.load_local_state_dict(saved["ranks"][self.rank])
        else:
            self.reporter.note(f"optimizer state in {ckpt} was saved at another layout "
                               f"({saved.get('layout') if isinstance(saved, dict) else 'single'}"
                               f"); resuming with fresh AdamW moments")


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
