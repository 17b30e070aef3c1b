"""Dense-gradient all-reduce overlapped with the backward pass (the DDP bucket scheme).

The dense (non-expert) gradients are averaged over every rank. Waiting for the whole backward
and then reducing leaves the network idle while the GPU computes and the GPU idle while the
network works; instead the dense parameters are cut, in reverse registration order (roughly
the order in which backward produces their gradients), into buckets of about `bucket_mb`, and a
bucket's asynchronous all-reduce is launched as soon as all its gradients are accumulated,
while backward goes on with the layers below.

Collectives must be issued in the same order on every rank, so buckets are launched strictly in
index order: a bucket that becomes ready early waits for the ones before it. A parameter that
received no gradient in this backward joins its bucket with zeros at `finish()`, so every rank
still issues the same reductions. With gradient accumulation only the last micro-batch's
backward reduces (`arm()` before it); the earlier ones just accumulate locally.

The result is the same as moeflow.parallel.grads.reduce_gradients: sum over ranks, then divide
by the world size (elementwise, so the bucketing does not change a single bit of it).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


class OverlappedGradReducer:
    def __init__(self, params: list[nn.Parameter], group, world: int,
                 bucket_mb: float = 25.0) -> None:
        self.group, self.world = group, world
        params = [p for p in params if p.requires_grad]
        self.buckets: list[list[nn.Parameter]] = []
        size, cap = 0, bucket_mb * 2 ** 20
        for p in reversed(params):
            if not self.buckets or size >= cap:
                self.buckets.append([])
                size = 0
            self.buckets[-1].append(p)
            size += p.numel() * p.element_size()
        self.bucket_of = {id(p): i for i, b in enumerate(self.buckets) for p in b}
        self.armed = False
        self._reset()
        self._hooks = [p.register_post_accumulate_grad_hook(self._ready) for p in params]

    def _reset(self) -> None:
        self.pending = [len(b) for b in self.buckets]
        self.next_launch = 0
        self.works: list[tuple[object, torch.Tensor, list[torch.Tensor]]] = []

    def arm(self) -> None:
        """The next backward is the step's last: reduce its gradients as they appear."""
        self.armed = True

    def _ready(self, p: nn.Parameter) -> None:
        if not self.armed:
            return
        i = self.bucket_of[id(p)]
        self.pending[i] -= 1
        while self.next_launch < len(self.buckets) and self.pending[self.next_launch] == 0:
            self._launch(self.next_launch)
            self.next_launch += 1

    @torch.no_grad()
    def _launch(self, i: int) -> None:
        grads = []
        for p in self.buckets[i]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = _flatten_dense_tensors(grads)
        work = dist.all_reduce(flat, group=self.group, async_op=True)
        self.works.append((work, flat, grads))

    @torch.no_grad()
    def finish(self) -> None:
        """Launch what backward left (unused parameters), wait, write the averages back."""
        if not self.armed:
            raise RuntimeError("OverlappedGradReducer.finish() without arm() before backward")
        while self.next_launch < len(self.buckets):
            self._launch(self.next_launch)
            self.next_launch += 1
        for work, flat, grads in self.works:
            work.wait()
            flat.div_(self.world)
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        self.armed = False
        self._reset()

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
