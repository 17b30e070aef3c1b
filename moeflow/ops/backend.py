"""The one place that decides which expert-MLP implementation runs.

Callers pass a requested backend ("auto" or a name from EXPERT_BACKENDS); "auto" picks the fastest
implementation known to work for the tensors at hand, so models pick the fast path by themselves
and tests can force any path.
"""

from __future__ import annotations

from typing import Callable

import torch

from moeflow.ops.expert_mlp import expert_mlp_grouped_mm, expert_mlp_reference

EXPERT_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "reference": expert_mlp_reference,
    "grouped_mm": expert_mlp_grouped_mm,
}


def grouped_mm_supported(x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> bool:
    """Whether torch._grouped_mm runs for these operands (device, dtype, 16-byte alignment)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    aligned = all(t.shape[-1] * t.element_size() % 16 == 0 for t in (x, w_in, w_out))
    if x.device.type == "cuda":
        return (x.dtype == torch.bfloat16 and aligned
                and torch.cuda.get_device_capability(x.device)[0] >= 9)
    return x.device.type == "cpu" and x.dtype == torch.float32


def resolve_expert_backend(requested: str, x: torch.Tensor, w_in: torch.Tensor,
                           w_out: torch.Tensor) -> Callable[..., torch.Tensor]:
    if requested == "auto":
        requested = "grouped_mm" if grouped_mm_supported(x, w_in, w_out) else "reference"
    try:
        return EXPERT_BACKENDS[requested]
    except KeyError:
        raise ValueError(f"expert backend {requested!r} unknown; choose auto or one of "
                         f"{', '.join(EXPERT_BACKENDS)}") from None
