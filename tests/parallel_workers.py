"""Process-group plumbing for the gloo tests: spawn N ranks with a deadline, run a worker.

Workers live here (an importable module) because spawned children unpickle them by name. Every
run has two timeouts: the process group's (a collective that never completes raises instead of
waiting forever) and the parent's deadline (kills the ranks and fails the test).
"""

from __future__ import annotations

import collections
import multiprocessing
import os
import socket
import time
import traceback
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moeflow.ops.backend import Backends
from moeflow.checkpoint import write_weights
from moeflow.parallel import ParallelConfig
from moeflow.parallel.equality import global_logits, run_steps
from moeflow.parallel.launch import init_distributed
from moeflow.parallel.trainer import ParallelTrainer
from moeflow.train import TrainConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, outdir, worker, args):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = worker(rank, world, *args)
        torch.save(result, Path(outdir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def spawn(worker, world: int, args: tuple, outdir: Path, timeout_s: float = 90.0) -> list:
    """Run worker(rank, world, *args) on `world` gloo ranks; returns each rank's result.

    The ranks fork from multiprocessing's fork server, which imported torch, moeflow and the
    workers once (the first call's preload): a spawned rank imported them itself, ~3 CPU s per
    rank, most of a small run. The fork server is one clean single-threaded process, so forking
    it is safe where forking the test process (threads, torch state) would not be, and every rank
    still starts from the same state. tests/conftest.py stops it at the end of the session."""
    multiprocessing.set_forkserver_preload([__name__, worker.__module__])
    ctx = mp.start_processes(_entry, args=(world, free_port(), str(outdir), worker, args),
                             nprocs=world, join=False, start_method="forkserver")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"distributed run did not finish within {timeout_s} s (hang)")
    return [torch.load(Path(outdir) / f"rank{r}.pt") for r in range(world)]


# ---- workers --------------------------------------------------------------------------------

def scenarios_worker(rank, world, scenarios, steps, ckpt_dir, eval_tokens):
    """Run each scenario {name: (TrainConfig kwargs, ParallelConfig kwargs, tweaks)} through the
    ParallelTrainer's train_step (`run_steps`), counting the collectives of the first one's
    steps; then write the first scenario's initial model with the checkpoint writer (every
    rank its chunks) and report its logits and next-step losses."""
    env = init_distributed("cpu")
    out = {}
    for name, (train_kwargs, parallel_kwargs, tweaks) in scenarios.items():
        trainer = ParallelTrainer(TrainConfig(**train_kwargs), ParallelConfig(**parallel_kwargs),
                                  env)
        trainer.prepare()
        tweak(trainer.model, tweaks)
        with count_collectives() as counts:
            out[name] = run_steps(trainer, steps)
        if "collectives" not in out:
            out["collectives"] = {k: v / steps for k, v in counts.items()}
    train_kwargs, parallel_kwargs, _ = next(iter(scenarios.values()))
    trainer = ParallelTrainer(TrainConfig(**train_kwargs), ParallelConfig(**parallel_kwargs), env)
    trainer.prepare()
    Path(ckpt_dir).mkdir(exist_ok=True)
    write_weights(Path(ckpt_dir), trainer.model, trainer.checkpoint_group, rank)
    out["saved"] = next_step(trainer, eval_tokens, sharded=True)
    return out


COLLECTIVES = ("all_reduce", "all_to_all_single", "all_gather", "all_gather_object",
               "broadcast", "barrier", "reduce_scatter_tensor", "all_gather_into_tensor")


@contextmanager
def count_collectives():
    """{'kind @ file:function': calls} of the torch.distributed collectives issued inside the
    block, each attributed to the innermost moeflow function that issued it (looking through
    the reduction objects of moeflow/parallel/mesh.py to their caller)."""
    counts: collections.Counter = collections.Counter()
    originals = {kind: getattr(dist, kind) for kind in COLLECTIVES}

    def counted(kind):
        def call(*args, **kwargs):
            where = next((f"{Path(f.filename).name}:{f.name}"
                          for f in reversed(traceback.extract_stack()[:-1])
                          if "/moeflow/" in f.filename
                          and not f.filename.endswith("parallel/mesh.py")), "?")
            counts[f"{kind} @ {where}"] += 1
            return originals[kind](*args, **kwargs)
        return call

    for kind in COLLECTIVES:
        setattr(dist, kind, counted(kind))
    try:
        yield counts
    finally:
        for kind, fn in originals.items():
            setattr(dist, kind, fn)


def tweak(model, tweaks: tuple[str, ...]) -> None:
    """"one_expert": all router scores equal (the gates zeroed), so in the first step the stable
    top-k sends every token to expert 0. "reference_experts": the plain-torch expert path (it
    skips empty experts). "triton_dispatch" / "triton_router": the Triton mapping-table gather
    and combine / the fused routing kernels (CUDA's defaults), run by Triton's interpreter on
    CPU. Applied to the built (and sharded) model: set_backends reaches every layer."""
    model.set_backends(Backends(experts="reference" if "reference_experts" in tweaks else "auto",
                                dispatch="triton" if "triton_dispatch" in tweaks else "auto",
                                router="triton" if "triton_router" in tweaks else "auto"))
    if "one_expert" in tweaks:
        with torch.no_grad():
            for layer in model.moe_layers():
                layer.router.gate.weight.zero_()


def next_step(trainer, eval_tokens, sharded):
    """Logits of the trainer's model on eval_tokens, then its first two steps' metrics rows."""
    logits = global_logits(trainer.model, eval_tokens, sharded)
    return {"logits": logits, "rows": run_steps(trainer, 2)["rows"]}


def trainer_worker(rank, world, train_kwargs, parallel_kwargs, eval_tokens):
    """A ParallelTrainer run on this rank; returns its final checkpoint and global logits."""
    trainer = ParallelTrainer(TrainConfig(**train_kwargs), ParallelConfig(**parallel_kwargs),
                              init_distributed("cpu"))
    result = trainer.run()
    logits = None if eval_tokens is None else global_logits(trainer.model, eval_tokens, True)
    return {"step": result.step, "checkpoint": str(result.checkpoint), "logits": logits}


def exchange_worker(rank, world, ranks_per_node):
    """Flat vs hierarchical all-to-all on random uneven counts (zeros included): outputs and
    input gradients, as seen by this rank."""
    from moeflow.parallel.all_to_all import all_to_all, gather_counts, hierarchical_all_to_all
    from moeflow.parallel.mesh import ParallelConfig, ParallelLayout, ProcessGroups

    cfg = ParallelConfig(ep=world, hierarchical=True, ranks_per_node=ranks_per_node)
    groups = ProcessGroups(ParallelLayout.build(cfg, world, rank, {0: world})).by_size(world)
    g = torch.Generator().manual_seed(rank)
    send_P = torch.randint(0, 4, (world,), generator=g)
    send_P[(rank + 1) % world] = 0  # every rank sends nothing to one peer
    counts_PP = gather_counts(send_P.view(world, 1), groups.ep).view(world, world)
    x = torch.randn(int(send_P.sum()), 3, generator=g, requires_grad=True)
    w = torch.randn(int(counts_PP[:, rank].sum()), 3, generator=g)
    flat = all_to_all(x, send_P.tolist(), counts_PP[:, rank].tolist(), groups.ep)
    (grad_flat,) = torch.autograd.grad((flat * w).sum(), x)
    hier = hierarchical_all_to_all(x, counts_PP, rank, groups.intra, groups.inter,
                                   groups.ranks_per_node)
    (grad_hier,) = torch.autograd.grad((hier * w).sum(), x)
    return {"flat": flat.detach(), "hier": hier.detach(), "grad_flat": grad_flat,
            "grad_hier": grad_hier, "sent": x.detach(), "counts": counts_PP}


def layouts_worker(rank, world, train_kwargs, parallel_kwargs, steps):
    """`train_kwargs` run on this rank: trained and checkpointed (`steps` None), or resumed
    from its latest checkpoint for `steps` steps; returns those steps' metrics rows."""
    env = init_distributed("cpu")
    trainer = ParallelTrainer(TrainConfig(**train_kwargs), ParallelConfig(**parallel_kwargs), env)
    if steps is None:
        trainer.run()
        return None
    return run_steps(trainer, steps)["rows"]


def grouped_step_worker(rank, world, config_dicts, seed, ids_BT, groups_BT, targets_BT):
    """One forward/backward of a model with expert groups, sharded over `world` EP ranks, each
    rank on its share of the global batch (with its tokens' group ids); returns, per config,
    the global-batch loss, aux loss and the reduced gradients (experts keyed by global id,
    dense parameters by name)."""
    import torch.nn.functional as F

    from moeflow.config import ModelConfig
    from moeflow.model import Transformer
    from moeflow.parallel.equality import expert_grads
    from moeflow.parallel.grads import reduce_gradients
    from moeflow.parallel.shard import shard_model

    out = {}
    per = ids_BT.shape[0] // world
    mine = slice(rank * per, (rank + 1) * per)
    for name, data in config_dicts.items():
        config = ModelConfig.from_dict(data["model"])
        torch.manual_seed(seed)
        model = Transformer(config)
        groups = shard_model(model, ParallelConfig(**data["parallel"]))
        result = model(ids_BT[mine], groups=groups_BT[mine])
        ce = F.cross_entropy(result.logits.flatten(0, 1), targets_BT[mine].flatten())
        (ce + result.router_loss).backward()
        reduce_gradients(model, groups)
        stats = torch.stack([ce.detach(), result.aux_loss.detach()])
        dist.all_reduce(stats)
        dense = {n: p.grad.clone() for n, p in model.named_parameters()
                 if "experts." not in n and p.grad is not None}
        out[name] = {"loss": stats / world, "expert_grads": expert_grads(model), "dense": dense}
    return out
