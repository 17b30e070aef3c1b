"""The int32 counters a module keeps for its ticketed kernels (moeflow.ops.tickets).

A module that launches a kernel drawing tickets (the decode router, the experts' one-launch
stream kernel) holds one DeviceCounters from construction and asks it for the counters at each
launch: made on the first launch on a device (zeros, which every launch leaves them at) and the
same tensor after that. A plain object rather than a tensor attribute reassigned per call: an
nn.Module's attribute assignment costs microseconds of host time per call, paid on every MoE
layer of an eager decode step. No Triton here: modules build it whether or not Triton is
installed.
"""

from __future__ import annotations

import torch


class DeviceCounters:
    def __init__(self) -> None:
        self._counters: torch.Tensor | None = None

    def get(self, count: int, device: torch.device) -> torch.Tensor:
        """`count` int32 counters on `device`, zero: the same tensor call after call, made anew
        when the count or the device changes."""
        counters = self._counters
        if counters is None or counters.numel() != count or counters.device != device:
            counters = self._counters = torch.zeros(count, dtype=torch.int32, device=device)
        return counters
