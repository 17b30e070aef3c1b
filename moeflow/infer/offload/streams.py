"""The copy stream and per-slot events of the expert cache, or no-ops without CUDA.

On CUDA, expert copies run on their own stream so they overlap the compute stream's kernels.
Two events per cache slot order the two streams without ever blocking the host:
  * `ready[s]`: recorded on the copy stream after a copy into slot s; compute that reads slot s
    waits for it (and only for it: compute never waits for a copy it does not need);
  * `free[s]`: recorded on the compute stream after the last kernel that read slot s; a copy
    that overwrites slot s waits for it, so an eviction cannot corrupt a kernel still reading.
On CPU (tests, `device="cpu"`) copies are synchronous and both events are no-ops, so the
cache's bookkeeping and data movement run exactly the same code.
"""

from __future__ import annotations

import contextlib

import torch


class SlotStreams:
    def __init__(self, device: torch.device, num_slots: int) -> None:
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.copy = torch.cuda.Stream(device=device)
            self.ready = [torch.cuda.Event() for _ in range(num_slots)]
            self.free = [torch.cuda.Event() for _ in range(num_slots)]

    def copying_into(self, slot: int):
        """Context for the copies that fill `slot`: on the copy stream, after its last reader."""
        if not self.cuda:
            return contextlib.nullcontext()
        self.copy.wait_event(self.free[slot])
        return torch.cuda.stream(self.copy)

    def copied(self, slot: int) -> None:
        if self.cuda:
            self.ready[slot].record(self.copy)

    def wait_ready(self, slots: list[int]) -> None:
        """Make the compute (current) stream wait for the copies into `slots`."""
        if self.cuda:
            stream = torch.cuda.current_stream()
            for s in slots:
                stream.wait_event(self.ready[s])

    def read_done(self, slots: list[int]) -> None:
        """Mark the end of the compute stream's reads of `slots` (issued so far)."""
        if self.cuda:
            stream = torch.cuda.current_stream()
            for s in slots:
                self.free[s].record(stream)


def to_device_async(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device` without a host sync: staged through pinned memory and copied
    non-blocking on the current stream (a blocking `.to(cuda)` waits for the whole stream, the
    expert copies queued before it included). Without CUDA, `t` itself."""
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
