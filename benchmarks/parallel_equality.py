"""The distributed-equality check on GPUs (NCCL): N ranks, EP=2 and EP=N, against one process.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/parallel_equality.py --out eq.json
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/parallel_equality.py --out eq4.json
    torchrun --nproc-per-node 2 benchmarks/parallel_equality.py --steps 2 --seq 16  # CPU: gloo

The same check as tests/test_parallel.py, through the trainer users run: the `tiny` preset made
dropless is trained for a few steps on a fixed synthetic corpus by ParallelTrainer on the ranks
(each rank runs its share of every global batch) and by Trainer in rank 0's process alone
(moeflow.parallel.equality.run_steps); the per-step losses, aux losses and gradient norms and
the first step's expert gradients (by global expert id) are compared. "one_expert" zeroes the
routers, so the first step sends every token to expert 0 and the other ranks' experts receive
nothing (it must not hang). In fp32: TF32 is off and the trainer's bf16 autocast is switched off
(`FP32`), so the differences are fp32 rounding and the bound is 1e-5.
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import random
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.config import ModelConfig  # noqa: E402
from moeflow.parallel import ParallelConfig  # noqa: E402
from moeflow.parallel.equality import run_steps, slice_of_full  # noqa: E402
from moeflow.parallel.launch import init_distributed, shutdown  # noqa: E402
from moeflow.parallel.trainer import ParallelTrainer  # noqa: E402
from moeflow.train import Trainer, TrainConfig  # noqa: E402


def scenarios(world: int) -> dict[str, tuple[dict, bool]]:
    """name -> (ParallelConfig kwargs, all tokens on one expert). EP = 2 on any world size (the
    rest data parallel), plus EP = world where that differs; hierarchical treats the ranks as
    nodes of 2 (of 1 on 2 ranks)."""
    out = {}
    for ep in sorted({2, world}):
        rpn = 2 if ep >= 4 else 1
        out[f"ep{ep}_dropless"] = ({"ep": ep}, False)
        out[f"ep{ep}_hierarchical"] = ({"ep": ep, "hierarchical": True, "ranks_per_node": rpn},
                                       False)
        out[f"ep{ep}_one_expert"] = ({"ep": ep}, True)
    return out


class FP32:
    """The trainer without its CUDA bf16 autocast: the comparison is of fp32 rounding."""

    def autocast(self):
        return nullcontext()


class FP32Trainer(FP32, Trainer):
    pass


class FP32ParallelTrainer(FP32, ParallelTrainer):
    pass


def write_corpus(root: Path, docs: int = 8, words: int = 2000) -> Path:
    """Synthetic text: random words from a small vocabulary. Written once, by rank 0, into a
    directory every rank reads (one node): a document's name is its path, which decides the
    train/validation split, so every rank must read the same path."""
    vocab = ("experts route tokens while dense layers replicate and ranks exchange rows over "
             "the group so every gradient is averaged").split()
    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(docs):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(vocab) for _ in range(words)))
    return root


def zero_gates(model) -> None:
    with torch.no_grad():
        for layer in model.moe_layers():
            layer.router.gate.weight.zero_()


def train(trainer: Trainer, force: bool, steps: int) -> dict:
    trainer.prepare()
    if force:
        zero_gates(trainer.model)
    return run_steps(trainer, steps)


def max_diff(a: list[dict], b: list[dict], key: str) -> float:
    return max(abs(x[key] - y[key]) for x, y in zip(a, b, strict=True))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--out")
    p.add_argument("--watchdog", type=float, default=0,
                   help="seconds after which every rank prints its stacks and exits (0: never)")
    args = p.parse_args()
    if args.watchdog > 0:  # a stuck collective then leaves a trace of where each rank waits
        faulthandler.dump_traceback_later(args.watchdog, exit=True)
    env = init_distributed()
    device = env.device
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    shared = [tempfile.mkdtemp(prefix="moeflow-equality-") if env.rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    tmp = Path(shared[0])
    if env.rank == 0:
        config = ModelConfig.from_name("tiny")
        config = config.replace(router=dataclasses.replace(config.router, dropless=True))
        config.save(tmp / "tiny.json")
        write_corpus(tmp / "text")
    dist.barrier()
    run = TrainConfig(model_config=str(tmp / "tiny.json"), data=(str(tmp / "text"),),
                      seq_len=args.seq, steps=args.steps, batch_size=args.batch,
                      device=device.type, progress=False, out=str(tmp / "unused"))
    results = {}
    for name, (parallel, force) in scenarios(env.world).items():
        if env.rank == 0:
            print(f"{name}: sharded run", flush=True)
        t0 = time.perf_counter()
        sharded = train(FP32ParallelTrainer(run, ParallelConfig(**parallel), env), force,
                        args.steps)
        seconds = time.perf_counter() - t0
        grads: list = [None] * env.world
        dist.all_gather_object(grads, sharded["expert_grads"])
        if env.rank == 0:
            ref = train(FP32Trainer(run), force, args.steps)
            merged = {k: v for part in grads for k, v in part.items()}
            grad_diff = max(float((v - slice_of_full(ref["expert_grads"], k, False)).abs().max())
                            for k, v in merged.items())
            loss_diff = max_diff(sharded["rows"], ref["rows"], "loss")
            aux_diff = max_diff(sharded["rows"], ref["rows"], "aux_loss")
            print(f"{name}: loss diff {loss_diff:.2e}, aux loss diff {aux_diff:.2e}, expert grad "
                  f"diff {grad_diff:.2e}", flush=True)
            results[name] = {
                "losses_sharded": [r["loss"] for r in sharded["rows"]],
                "losses_one_process": [r["loss"] for r in ref["rows"]],
                "grad_norms_sharded": [r["grad_norm"] for r in sharded["rows"]],
                "grad_norms_one_process": [r["grad_norm"] for r in ref["rows"]],
                "max_loss_diff": loss_diff, "max_aux_loss_diff": aux_diff,
                "max_expert_grad_diff": grad_diff, "seconds_sharded": seconds,
                "pass": max(loss_diff, aux_diff, grad_diff) <= 1e-5}
        dist.barrier()
    if env.rank == 0:
        out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               "backend": env.backend, "world": env.world, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(sys.argv), "scenarios": results}
        text = json.dumps(out, indent=1)
        print(text)
        if args.out:
            Path(args.out).write_text(text + "\n")
    shutdown(env)


if __name__ == "__main__":
    main()
