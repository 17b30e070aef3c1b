"""Each cache slot's next input token, kept on the device, and the host's copy of sampled tokens.

A decode step's input is the token the step before it sampled. The engine samples on the device
and leaves that token where the next step reads it (`NextTokens.ids`, the decode graphs' token
input), so it can launch step n+1 before the host has read step n's tokens: the host's work for
step n (the copy's wait, stop checks, events, the caller's own handling of them) then overlaps
the GPU's step n+1 instead of leaving the GPU idle between steps (moeflow.infer.engine,
"pipelined decode"). A prefill writes its request's first token into the request's slot the same
way, and moving a sequence to another slot (moeflow.infer.scheduler.release) moves its token.

The host gets its copy of a step's tokens one of two ways: a decode step whose rows are all
greedy has its argmax kernel publish them into the token ring (moeflow.infer.token_ring, on a
GPU with Triton: nothing runs between two decode graphs); any other step (rows that sample, a
prefill's first token) copies them to pinned memory after the step and records an event.
"""

from __future__ import annotations

from typing import Callable

import torch

from moeflow.infer.scheduler import Request
from moeflow.infer.token_ring import TokenRing


class SampledTokens:
    """Tokens sampled on the device for `requests` (row i is requests[i]'s), on their way to the
    host; `read()` waits for them only, not for later work."""

    def __init__(self, requests: list[Request], read: Callable[[], list[int]]) -> None:
        self.requests, self.read = requests, read


def _copied(host_n: torch.Tensor, copied: torch.cuda.Event | None) -> Callable[[], list[int]]:
    def read() -> list[int]:
        if copied is not None:
            copied.synchronize()
        return host_n.tolist()
    return read


class NextTokens:
    def __init__(self, num_slots: int, device: torch.device, ring: bool = False) -> None:
        """`ring`: decode steps publish their greedy tokens into a TokenRing (`self.ring`,
        which the step's argmax kernel writes)."""
        self.ids = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._cuda = torch.device(device).type == "cuda"
        self.ring = TokenRing(num_slots, device) if ring else None

    def record(self, first_slot: int, tokens_n: torch.Tensor, requests: list[Request],
               published: int | None = None) -> SampledTokens:
        """tokens_n ([n] int64, on the device) become the next inputs of slots first_slot ...
        first_slot + n - 1 (requests' slots, in order); returns their copy for the host.
        `published`: the decode step's seq in the ring (TokenRing.issued), whose greedy tokens
        the host reads there when tokens_n are those (written in place by the step)."""
        n = tokens_n.numel()
        ids_n = self.ids[first_slot:first_slot + n]
        if tokens_n.data_ptr() == ids_n.data_ptr():  # a decode step wrote them in place
            if published is not None:
                ring = self.ring
                return SampledTokens(requests, lambda: ring.read(published, n))
        else:
            ids_n.copy_(tokens_n)
        host_n = torch.empty(n, dtype=torch.int64, pin_memory=self._cuda)
        host_n.copy_(tokens_n, non_blocking=self._cuda)
        copied = None
        if self._cuda:
            copied = torch.cuda.Event()
            copied.record()
        return SampledTokens(requests, _copied(host_n, copied))

    def move(self, src: int, dst: int) -> None:
        """The sequence in slot src moved to dst (its KV cache moves alongside)."""
        self.ids[dst:dst + 1].copy_(self.ids[src:src + 1])
