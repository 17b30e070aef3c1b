"""The dtype an op computes in when autocast may be on: the one rule the hand-written autograd
ops (the fused LM-head loss, the FP8 GEMMs) and the experts' cast share, so each runs its
matmuls in the dtype autocast would have given the layer."""

from __future__ import annotations

import torch


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matmuls in on `device`, or None when autocast is off."""
    if not torch.is_autocast_enabled(device.type):
        return None
    return torch.get_autocast_dtype(device.type)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM on `x` runs in: the autocast dtype when autocast is on, else x's."""
    return autocast_dtype(x.device) or x.dtype
