"""The distributed-equality check on GPUs (NCCL): N ranks, EP=2 and EP=N, against one process.

    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 2 benchmarks/parallel_equality.py --out eq.json
    NCCL_NVLS_ENABLE=0 torchrun --nproc-per-node 4 benchmarks/parallel_equality.py --out eq4.json

The same scenarios as tests/test_parallel.py runs on CPU with gloo, in fp32 on CUDA: the `tiny`
preset made dropless, trained for 5 AdamW steps on fixed random batches, once sharded (each rank
runs its share of every global batch) and once in rank 0's process alone; the per-step losses and
the step-0 expert gradients (by global expert id) are compared. "one_expert" zeroes the router so
every token goes to expert 0 and the other ranks' experts receive nothing (it must not hang).
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moeflow.config import ModelConfig  # noqa: E402
from moeflow.parallel import ParallelConfig  # noqa: E402
from moeflow.parallel.equality import build_model, run_steps, slice_of_full  # noqa: E402
from moeflow.parallel.launch import init_distributed, shutdown  # noqa: E402

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


def zero_gates(model) -> None:
    for layer in model.moe_layers():
        torch.nn.init.zeros_(layer.router.gate.weight)
        layer.router.gate.weight.requires_grad_(False)


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
    config = ModelConfig.from_name("tiny")
    config = config.replace(router=dataclasses.replace(config.router, dropless=True))
    g = torch.Generator().manual_seed(7)
    batches = torch.randint(0, config.vocab_size, (args.steps, args.batch, args.seq + 1),
                            generator=g)
    results = {}
    for name, (parallel, force) in scenarios(env.world).items():
        model = build_model(config, seed=0, device=device)
        if force:
            zero_gates(model)
        if env.rank == 0:
            print(f"{name}: sharded run", flush=True)
        t0 = time.perf_counter()
        sharded = run_steps(config, ParallelConfig(**parallel), model=model, batches=batches,
                            device=str(device))
        seconds = time.perf_counter() - t0
        grads: list = [None] * env.world
        dist.all_gather_object(grads, sharded["expert_grads"])
        if env.rank == 0:
            ref_model = build_model(config, seed=0, device=device)
            if force:
                zero_gates(ref_model)
            ref = run_steps(config, None, model=ref_model, batches=batches, device=str(device))
            merged = {k: v for part in grads for k, v in part.items()}
            grad_diff = max(float((v - slice_of_full(ref["expert_grads"], k, False)).abs().max())
                            for k, v in merged.items())
            loss_diff = max(abs(a - b) for a, b in zip(sharded["losses"], ref["losses"]))
            print(f"{name}: loss diff {loss_diff:.2e}, expert grad diff {grad_diff:.2e}",
                  flush=True)
            results[name] = {"losses_sharded": sharded["losses"], "losses_one_process":
                             ref["losses"], "max_loss_diff": loss_diff,
                             "max_expert_grad_diff": grad_diff, "seconds_sharded": seconds,
                             "pass": loss_diff <= 1e-5 and grad_diff <= 1e-5}
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
