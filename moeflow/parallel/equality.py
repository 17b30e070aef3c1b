"""Loss comparison between a sharded run and a 1-process run of the same global batches.

The distributed-correctness check (torchtitan's loss_compare idea), run through the trainer users
run: `moeflow.train.Trainer` in one process and `moeflow.parallel.ParallelTrainer` on each rank
train the same model on the same global batches, and their metrics rows (loss, aux loss, gradient
norm, each the global batch's) and the first step's expert gradients, keyed by global expert id,
are compared. With dropless routing and the routing statistics reduced over the data-parallel
ranks, the two agree to float rounding. Used by tests/test_parallel.py (gloo, CPU) and
benchmarks/parallel_equality.py (NCCL, GPUs).

`run_steps` drives the trainer's own `train_step` (what `Trainer.run` calls each step, in the
same deterministic mode) without validation and checkpoints, and keeps the gradients that
`train_step` leaves behind after its first step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from moeflow.model.moe import MoELayer
from moeflow.parallel.shard import slice_columns
from moeflow.train.determinism import deterministic_on_cpu
from moeflow.train.trainer import Trainer


def run_steps(trainer: Trainer, steps: int) -> dict:
    """`steps` optimizer steps of `trainer` (prepared here unless it already is); returns
    {'rows': its metrics rows, 'expert_grads': the first step's reduced expert gradients}."""
    if not trainer.prepared:
        trainer.prepare()
    rows, grads = [], None
    with deterministic_on_cpu(trainer.device):
        for step in range(trainer.start_step + 1, trainer.start_step + steps + 1):
            rows.append(trainer.train_step(step))
            if grads is None:
                grads = expert_grads(trainer.model)
    return {"rows": rows, "expert_grads": grads}


def expert_grads(model) -> dict[str, torch.Tensor]:
    """{'layer.name.expert[.slice]': grad} keyed by global expert id."""
    out = {}
    for i, block in enumerate(model.blocks):
        if not isinstance(block.ffn, MoELayer):
            continue
        ex = block.ffn.experts
        lay = ex.layout
        for name in ("w_in_EDI", "w_out_EFD"):
            g = getattr(ex, name).grad
            for local, gid in enumerate(ex.expert_ids):
                key = f"{i}.{name}.{gid}"
                if lay is not None and lay.slices > 1:
                    key += f".slice{lay.slice_index}of{lay.slices}"
                out[key] = g[local].detach().cpu().clone()
    return out


def slice_of_full(full: dict[str, torch.Tensor], key: str, swiglu: bool) -> torch.Tensor:
    """The full-model gradient matching a (possibly sliced) key of `expert_grads`."""
    base, _, part = key.partition(".slice")
    t = full[base]
    if not part:
        return t
    j, s = (int(v) for v in part.split("of"))
    name = base.split(".")[1]
    F_ = t.shape[0] if name == "w_out_EFD" else t.shape[-1] // (2 if swiglu else 1)
    cols = slice_columns(F_, s, j, swiglu)
    return t[cols[: F_ // s]] if name == "w_out_EFD" else t[:, cols]


@torch.no_grad()
def global_logits(model, tokens_BT: torch.Tensor, sharded: bool) -> torch.Tensor:
    """Logits for the whole batch; when sharded each rank computes its part, then all-gather."""
    was_training = model.training
    model.eval()
    if not sharded:
        logits = model(tokens_BT).logits.float().cpu()
        model.train(was_training)
        return logits
    world, rank = dist.get_world_size(), dist.get_rank()
    per = tokens_BT.shape[0] // world
    mine = model(tokens_BT[rank * per:(rank + 1) * per]).logits.float().contiguous()
    parts = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(parts, mine)
    model.train(was_training)
    return torch.cat(parts).cpu()
