"""Each cache slot's next input token, kept on the device, and the host's copy of sampled tokens.

A decode step's input is the token the step before it sampled. The engine samples on the device
and leaves that token where the next step reads it (`NextTokens.ids`, the decode graphs' token
input), so it can launch step n+1 before the host has read step n's tokens: the host's work for
step n (the copy's wait, stop checks, events, the caller's own handling of them) then overlaps
the GPU's step n+1 instead of leaving the GPU idle between steps (moeflow.infer.engine,
"pipelined decode"). A prefill writes its request's first token into the request's slot the same
way, and moving a sequence to another slot (moeflow.infer.scheduler.release) moves its token.
"""

from __future__ import annotations

import torch

from moeflow.infer.scheduler import Request


class SampledTokens:
    """Tokens sampled on the device for `requests` (row i is requests[i]'s), on their way to the
    host by a non-blocking copy; `read()` waits for that copy only, not for later work."""

    def __init__(self, requests: list[Request], host_n: torch.Tensor,
                 copied: torch.cuda.Event | None) -> None:
        self.requests, self._host_n, self._copied = requests, host_n, copied

    def read(self) -> list[int]:
        if self._copied is not None:
            self._copied.synchronize()
        return self._host_n.tolist()


class NextTokens:
    def __init__(self, num_slots: int, device: torch.device) -> None:
        self.ids = torch.zeros(num_slots, dtype=torch.int64, device=device)
        self._cuda = torch.device(device).type == "cuda"

    def record(self, first_slot: int, tokens_n: torch.Tensor, requests: list[Request]
               ) -> SampledTokens:
        """tokens_n ([n] int64, on the device) become the next inputs of slots first_slot ...
        first_slot + n - 1 (requests' slots, in order); returns their copy for the host."""
        n = tokens_n.numel()
        ids_n = self.ids[first_slot:first_slot + n]
        if tokens_n.data_ptr() != ids_n.data_ptr():  # else a decode step wrote them in place
            ids_n.copy_(tokens_n)
        host_n = torch.empty(n, dtype=torch.int64, pin_memory=self._cuda)
        host_n.copy_(tokens_n, non_blocking=self._cuda)
        copied = None
        if self._cuda:
            copied = torch.cuda.Event()
            copied.record()
        return SampledTokens(requests, host_n, copied)

    def move(self, src: int, dst: int) -> None:
        """The sequence in slot src moved to dst (its KV cache moves alongside)."""
        self.ids[dst:dst + 1].copy_(self.ids[src:src + 1])
