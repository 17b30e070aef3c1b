"""Rank 0 tells the other ranks what each forward of a multi-rank engine runs.

Under tensor slicing and expert parallelism (moeflow.parallel.inference) every forward is
collective: every rank must run the same prefill or decode step at the same time. Only rank 0
has a scheduler, tokenizer and sampler; before each forward it broadcasts a `StepOp` (the cache
slot moves its scheduler made since the last forward, then the step's inputs), and the other
ranks, in `Engine.follow`, replay the moves and run the same forward. Logits come out on every
rank (the LM head is whole on each); only rank 0 samples, and its sampled tokens reach the
others as the next decode step's inputs.

Encoding: one int64 header [kind, moves, len(a), len(b), slot], then one int64 payload (moves as
(src, dst, length) triples, then a, then b), two broadcasts per forward, on the process's
device (NCCL needs GPU tensors; gloo takes CPU ones).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

KINDS = ("decode", "prefill", "stop")


@dataclass(frozen=True)
class StepOp:
    kind: str  # "decode": a = tokens, b = cached lengths; "prefill": a = prompt ids into `slot`
    moves: tuple[tuple[int, int, int], ...] = ()  # cache slot moves (src, dst, length) first
    a: tuple[int, ...] = ()
    b: tuple[int, ...] = ()
    slot: int = 0


class StepChannel:
    """Broadcasts StepOps from rank 0 of `group` (`src`, a global rank) to the others."""

    def __init__(self, group, src: int, device: torch.device) -> None:
        self.group, self.src, self.device = group, src, device

    def send(self, op: StepOp) -> None:
        header = torch.tensor([KINDS.index(op.kind), len(op.moves), len(op.a), len(op.b),
                               op.slot], dtype=torch.int64, device=self.device)
        payload = torch.tensor([v for m in op.moves for v in m] + list(op.a) + list(op.b),
                               dtype=torch.int64, device=self.device)
        dist.broadcast(header, self.src, group=self.group)
        if payload.numel():
            dist.broadcast(payload, self.src, group=self.group)

    def recv(self) -> StepOp:
        header = torch.empty(5, dtype=torch.int64, device=self.device)
        dist.broadcast(header, self.src, group=self.group)
        kind, n_moves, n_a, n_b, slot = header.tolist()
        size = 3 * n_moves + n_a + n_b
        values: list[int] = []
        if size:
            payload = torch.empty(size, dtype=torch.int64, device=self.device)
            dist.broadcast(payload, self.src, group=self.group)
            values = payload.tolist()
        moves = tuple(tuple(values[3 * i:3 * i + 3]) for i in range(n_moves))
        a = tuple(values[3 * n_moves:3 * n_moves + n_a])
        return StepOp(KINDS[kind], moves, a, tuple(values[3 * n_moves + n_a:]), slot)
