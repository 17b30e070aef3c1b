"""Loss comparison between a sharded run and a 1-process run of the same global batches.

The distributed-correctness check (torchtitan's loss_compare idea): train a model for a few steps
on fixed random token batches, once in one process and once sharded over ranks with the global
batch split between them, and compare the per-step losses and the expert gradients. With dropless
routing and the routing statistics reduced over the data-parallel ranks, the two must agree to
float rounding. Used by tests/test_parallel_train.py (gloo, CPU) and
benchmarks/parallel_equality.py (NCCL, GPUs).

`run_steps` is the one workload; call it in each rank of an initialised process group (pass a
ParallelConfig) or in a single process (parallel=None).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moeflow.config import ModelConfig
from moeflow.model.transformer import Transformer
from moeflow.parallel.grads import ShardedOptimizer, reduce_gradients
from moeflow.parallel.mesh import ParallelConfig
from moeflow.parallel.shard import shard_model, slice_columns


def token_batches(config: ModelConfig, steps: int, batch: int, seq: int, seed: int
                  ) -> torch.Tensor:
    """[steps, batch, seq + 1] random token ids, the same in every process."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randint(0, config.vocab_size, (steps, batch, seq + 1), generator=g)


def lm_loss(model, tokens_BT1: torch.Tensor) -> torch.Tensor:
    out = model(tokens_BT1[:, :-1])
    ce = F.cross_entropy(out.logits.flatten(0, 1).float(), tokens_BT1[:, 1:].flatten())
    return ce + out.router_loss


def expert_grads(model) -> dict[str, torch.Tensor]:
    """{'layer.name.expert[.slice]': grad} keyed by global expert id."""
    out = {}
    for i, block in enumerate(model.blocks):
        ex = getattr(block.ffn, "experts", None)
        if ex is None:
            continue
        lay = getattr(ex, "layout", None)
        ids = lay.expert_ids if lay is not None else range(ex.num_experts)
        for name in ("w_in_EDI", "w_out_EFD"):
            g = getattr(ex, name).grad
            for local, gid in enumerate(ids):
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


def build_model(config: ModelConfig, seed: int, device: str | torch.device) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(config).to(device)


def run_steps(config: ModelConfig, parallel: ParallelConfig | None, steps: int = 5,
              batch: int = 4, seq: int = 16, seed: int = 0, device: str = "cpu",
              lr: float = 1e-3, model=None, batches: torch.Tensor | None = None) -> dict:
    """Train `steps` AdamW steps; returns {'losses': [...], 'expert_grads': step-0 grads}.

    Losses are the global-batch losses (averaged over ranks when sharded)."""
    if model is None:
        model = build_model(config, seed, device)
    if batches is None:
        batches = token_batches(config, steps, batch, seq, seed)
    world, rank = 1, 0
    groups = None
    if parallel is not None:
        world, rank = dist.get_world_size(), dist.get_rank()
        if getattr(model, "parallel_layout", None) is None:
            groups = shard_model(model, parallel)
        else:
            groups = model.parallel_groups
        if batches.shape[1] % world:
            raise ValueError(f"global batch {batches.shape[1]} not divisible by {world} ranks")
    per_rank = batches.shape[1] // world
    model.train()
    if groups is not None:
        opt = ShardedOptimizer(model, groups, torch.optim.AdamW, zero=parallel.zero, lr=lr)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr)
    losses, grads0 = [], None
    for step in range(batches.shape[0]):
        tokens = batches[step, rank * per_rank:(rank + 1) * per_rank].to(device)
        loss = lm_loss(model, tokens)
        loss.backward()
        reported = loss.detach().clone()
        if groups is not None:
            reduce_gradients(model, groups)
            dist.all_reduce(reported)
            reported /= world
        if step == 0:
            grads0 = expert_grads(model)
        opt.step()
        opt.zero_grad()
        losses.append(float(reported))
    return {"losses": losses, "expert_grads": grads0}


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
