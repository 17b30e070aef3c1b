"""Start torch.distributed from torchrun's environment: NCCL on GPUs, gloo on CPU.

One node, N processes:
    torchrun --nproc-per-node N -m moeflow train ... --ep E

Several nodes (run the same command on every node; torchrun's c10d rendezvous elects the store):
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \
             --rdzv-endpoint HOST0:29500 --rdzv-id RUN_NAME -m moeflow train ... --ep 16
HOST0 is any node reachable by all (its port must be open); RUN_NAME is shared by the nodes of one
run. torchrun exports RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE, which is all this module
reads; LOCAL_WORLD_SIZE becomes the ranks-per-node of the hierarchical all-to-all. Ranks are
numbered node-major, so an EP group of at most LOCAL_WORLD_SIZE ranks stays inside one node.
Backend: NCCL when the process's device is a GPU (one GPU per process, chosen by LOCAL_RANK),
gloo on CPU. Without WORLD_SIZE/MASTER_ADDR in the environment the run is a single process and
nothing is initialised.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    local_world: int
    backend: str | None  # None: single process, torch.distributed not initialised
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def choose_backend(device_type: str) -> str:
    return "nccl" if device_type == "cuda" else "gloo"


def init_distributed(device: str | None = None, timeout_s: float = 600.0) -> DistEnv:
    """Initialise from torchrun env vars (if present) and pick this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank % max(torch.cuda.device_count(), 1))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world == 1 and "MASTER_ADDR" not in os.environ:
        return DistEnv(0, 1, 0, 1, None, dev)
    backend = choose_backend(dev.type)
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if backend == "nccl" else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    return DistEnv(rank, world, local_rank, local_world, backend, dev)


def shutdown(env: DistEnv) -> None:
    if env.backend is not None and dist.is_initialized():
        dist.destroy_process_group()


def finish(env: DistEnv) -> None:
    """`shutdown` once every rank has got here, for a clean end: a rank that destroyed the
    process group while a peer still read its last message aborted that peer ("terminate
    called without an active exception": 2 of 12 two-rank `generate` runs exited 1 after
    printing their text). Error paths call `shutdown` alone: a dead peer never arrives."""
    if env.backend is not None and dist.is_initialized():
        dist.barrier()
    shutdown(env)
