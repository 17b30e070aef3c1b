"""FSDP2 (`fully_shard`) against moeflow's own data-parallel path: equal losses? faster steps?

The issue asks whether PyTorch's FSDP2 should replace moeflow's hand-written dense-gradient
reduction (moeflow.parallel.overlap, DDP-style buckets) and its ZeRO-1 optimizer sharding
(moeflow.parallel.grads.ShardedOptimizer). This script trains the same model on the same global
batches three ways and compares the per-step training loss and the step time:

  moeflow       ParallelTrainer, ep=1 (pure data parallel), overlapped bucketed all-reduce
  moeflow-zero  the same with ZeRO-1 optimizer sharding
  fsdp2         the single-process Trainer with `fully_shard` on every block and on the root
                (parameters, gradients and AdamW moments sharded; reduce-scatter in backward)

All three use the trainer's own loop (moeflow.train.trainer.Trainer.train_step); only the
parallel hooks differ. The router's balance loss is switched off (aux_loss_coef=0) because
moeflow's data-parallel path computes it over the global batch and a plain FSDP2 model over
each rank's tokens; every other part of the objective is the same, so the losses must agree to
float rounding.

    torchrun --nproc-per-node 2 benchmarks/fsdp2_eval.py --device cpu --out /tmp/fsdp2   # gloo
    torchrun --nproc-per-node 1 benchmarks/fsdp2_eval.py --device cuda --out $OUT/fsdp2  # 1 GPU

Each mode's rows (step, loss, tokens/s) and a summary go to OUT/fsdp2_eval.json (rank 0).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from moeflow.data.prepared import DataSpec, prepare_dataset
from moeflow.parallel.launch import DistEnv, init_distributed, shutdown
from moeflow.parallel.mesh import ParallelConfig
from moeflow.parallel.trainer import ParallelTrainer
from moeflow.train.run_config import TrainConfig
from moeflow.train.trainer import Trainer


class Fsdp2Trainer(Trainer):
    """The single-process loop with FSDP2 as its parallel hooks (evaluation only)."""

    def __init__(self, config: TrainConfig, env: DistEnv) -> None:
        super().__init__(config, rank=env.rank, world=env.world)
        self.env = env

    def resolve_device(self) -> torch.device:
        return self.env.device

    def parallelize(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.world > 1 or dist.is_initialized():
            mesh = torch.distributed.device_mesh.init_device_mesh(self.env.device.type,
                                                                  (self.world,))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
        return model

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        params = [p for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if isinstance(norm, DTensor) else norm

    def reduce_stats(self, sums, counts):
        if self.world == 1:
            return sums, counts
        keys = sorted(sums)
        flat = torch.stack([sums[k].to(self.env.device, torch.float64) for k in keys])
        dist.all_reduce(flat)
        return dict(zip(keys, (flat / self.world).unbind())), counts

    def save(self, step: int):
        return None  # evaluation only: the timed loop is what matters

    def evaluate(self):
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "moe_layers": [],
                "expert_load": []}


class _NoSaveParallel(ParallelTrainer):
    def save(self, step: int):
        return None

    def evaluate(self):
        return {"val_loss": float("nan"), "val_ppl": float("nan"), "moe_layers": [],
                "expert_load": []}


def rows_of(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r for r in rows if "loss" in r and "tokens_per_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    env = init_distributed(args.device)
    out = Path(args.out)
    work = Path(tempfile.mkdtemp(prefix="fsdp2_eval_")) if env.rank == 0 else None
    box = [str(work)]
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    work = Path(box[0])
    if env.rank == 0:  # tokenize once; every mode reads the same prepared tokens
        prepare_dataset(DataSpec(vocab_size=2048, max_bytes=8 << 20), work / "data",
                        log=lambda m: None)
    if dist.is_initialized():
        dist.barrier()
    base = dict(preset=args.preset, data=(str(work / "data"),), steps=args.steps,
                batch_size=args.batch_size, seq_len=args.seq_len, val_every=10 ** 9,
                aux_loss_coef=0.0, vocab_size=2048, lr=1e-3, warmup_steps=2, progress=False, seed=0,
                device=args.device)
    results = {}
    modes = {
        "moeflow": lambda cfg: _NoSaveParallel(cfg, ParallelConfig(ep=1), env),
        "moeflow-zero": lambda cfg: _NoSaveParallel(cfg, ParallelConfig(ep=1, zero=True), env),
        "fsdp2": lambda cfg: Fsdp2Trainer(cfg, env),
    }
    for name, make in modes.items():
        cfg = TrainConfig(**base, out=str(work / name))
        t0 = time.perf_counter()
        make(cfg).run()
        wall = time.perf_counter() - t0
        if dist.is_initialized():
            dist.barrier()
        rows = rows_of(work / name)
        timed = [r["tokens_per_s"] for r in rows[args.warmup:]]
        results[name] = {"wall_s": wall, "loss": [r["loss"] for r in rows],
                         "grad_norm": [r["grad_norm"] for r in rows],
                         "median_tokens_per_s": statistics.median(timed) if timed else None}
    if env.rank == 0:
        ref = results["moeflow"]["loss"]
        for name, r in results.items():
            r["max_abs_loss_diff_vs_moeflow"] = max(
                (abs(a - b) for a, b in zip(r["loss"], ref)), default=None)
        summary = {"world": env.world, "device": str(env.device),
                   "gpu": torch.cuda.get_device_name() if env.device.type == "cuda" else None,
                   "torch": torch.__version__, "args": vars(args), "results": results}
        out.mkdir(parents=True, exist_ok=True)
        (out / "fsdp2_eval.json").write_text(json.dumps(summary, indent=1))
        for name, r in results.items():
            print(f"{name:13s} loss[0] {r['loss'][0]:.5f} loss[-1] {r['loss'][-1]:.5f} "
                  f"max|dloss| {r['max_abs_loss_diff_vs_moeflow']:.2e} "
                  f"median {r['median_tokens_per_s']:.0f} tok/s wall {r['wall_s']:.1f} s")
    shutdown(env)


if __name__ == "__main__":
    main()
